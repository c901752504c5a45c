"""End-to-end fixtures: no ``gd2po up`` outlives the test that started it."""

from __future__ import annotations

import pytest
from stack_helpers import stop_leftover_runs


@pytest.fixture(autouse=True)
def _stop_leftover_runs():
    yield
    stop_leftover_runs()
