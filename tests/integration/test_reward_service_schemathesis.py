"""Schemathesis against the live tool-call correctness service's own OpenAPI schema: generated valid and
invalid requests never get a 5xx, and every status code and body the service sends is documented.

The schema is taken from the app before collection (schemathesis 4.32's lazy ``from_fixture`` loader
breaks on pytest 9: it writes ``node._nodeid``); a test checks the live server serves the same one.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from live_server import serve
from openapi_tools import homogeneous_tuples
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from reward_service.app import create_app
from reward_service.scorers import build_scorer
from reward_service.settings import ServiceSettings

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def build_app():
    # Small limits so generated batches and bodies also reach the 413 paths.
    limits = ServiceSettings(max_batch_items=8, max_body_bytes=4096)
    return create_app(build_scorer("tool_call.correctness"), limits)


RAW_SCHEMA = build_app().openapi()
schema = schemathesis.openapi.from_dict(homogeneous_tuples(RAW_SCHEMA))


@pytest.fixture(scope="module")
def service_url():
    with serve(build_app(), ready_path="/readyz") as url:
        yield url


def test_the_live_service_serves_the_schema_under_test(service_url: str) -> None:
    assert httpx.get(f"{service_url}/openapi.json").json() == RAW_SCHEMA


@schema.parametrize()
@settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_server_errors_and_only_documented_responses(case: schemathesis.Case, service_url: str) -> None:
    case.call_and_validate(base_url=service_url, checks=CHECKS)
