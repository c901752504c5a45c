"""gd2po.learning: the one rule that says a reward curve rose (learning test, run summary, benches)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gd2po.learning import first_reach, normalised_total, quarter_rise


def test_a_rise_is_measured_in_pooled_standard_deviations_of_the_quarters() -> None:
    # first quarter [0, 2] (mean 1, var 2), last quarter [4, 6] (mean 5, var 2): Δ 4 over sd √2.
    rise = quarter_rise([0, 2, 9, 9, 9, 9, 4, 6])
    assert (rise.first, rise.last, rise.quarter) == (1.0, 5.0, 2)
    assert rise.pooled_sd == pytest.approx(math.sqrt(2))
    assert rise.in_sd == pytest.approx(4 / math.sqrt(2))
    assert rise.rose()


def test_a_rise_smaller_than_twice_the_noise_does_not_count() -> None:
    # Δ 1 over a pooled sd of √2: 0.71 sd.
    rise = quarter_rise([0, 2, 0, 0, 0, 0, 1, 3])
    assert rise.delta == 1.0 and not rise.rose()


def test_a_fall_never_counts_as_a_rise() -> None:
    assert not quarter_rise([5, 5, 0, 0, 0, 0, 1, 1]).rose()
    assert quarter_rise([5, 5, 0, 0, 0, 0, 1, 1]).in_sd == -math.inf


def test_fewer_than_eight_steps_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 8"):
        quarter_rise([1.0] * 7)


@given(st.integers(min_value=0, max_value=10_000))
def test_a_stationary_noisy_curve_does_not_rise(seed: int) -> None:
    rng = random.Random(seed)
    curve = [rng.gauss(0.5, 0.1) for _ in range(64)]
    # For quarters of 16 the statistic's sd is ~0.35: 2 sd is beyond 5.6 of its standard deviations.
    assert not quarter_rise(curve).rose()


def test_normalised_total_puts_each_reward_on_its_declared_range() -> None:
    means = {"correctness": [-3.0, 0.0, 3.0], "format": [0.0, 0.5, 1.0]}
    assert normalised_total(means, {"correctness": (-3, 3), "format": (0, 1)}) == [0.0, 1.0, 2.0]


def test_normalised_total_falls_back_to_the_curves_own_range() -> None:
    assert normalised_total({"x": [2.0, 4.0]}, {}) == [0.0, 1.0]
    assert normalised_total({"x": [2.0, 4.0]}, {"x": (1.0, 1.0)}) == [0.0, 1.0]  # empty range


def test_first_reach_needs_every_reward_over_its_target_on_the_trailing_mean() -> None:
    curves = {"a": [0.0, 1.0, 0.0, 1.0, 1.0, 1.0], "b": [0.0, 0.0, 0.6, 0.6, 0.6, 0.6]}
    # Step 2: a's single lucky step is not enough with a window of 2 (mean 0.5).
    assert first_reach(curves, {"a": 0.9, "b": 0.5}, window=2) == 5
    assert first_reach(curves, {"a": 0.5}, window=2) == 2
    assert first_reach(curves, {"a": 0.9, "b": 0.7}, window=2) is None
    assert first_reach(curves, {"a": 1.0}, window=1) == 2
