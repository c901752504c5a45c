"""Adaptive τ (trainer/algorithms/adaptive_tau.py): τ never leaves its bounds nor moves more than `gain`
a step, whatever the drop ratios; on a fixed synthetic reward stream the GD²PO-SNR drop ratio reaches the
target within a stated number of steps and tolerance; bad settings and inputs are refused."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from proto.config import ConfigError, load_config
from trainer.algorithms import compute_advantages
from trainer.algorithms.adaptive_tau import TauController

unit = st.floats(min_value=0.0, max_value=1.0)


@st.composite
def controllers(draw) -> TauController:
    low, high = sorted((draw(unit), draw(unit)))
    return TauController(
        target=draw(unit),
        gain=draw(st.floats(min_value=1e-6, max_value=10.0)),
        tau_min=low,
        tau_max=high,
        tau=draw(unit),
    )


@given(controllers(), st.lists(unit, max_size=60))
def test_tau_stays_within_its_bounds_and_moves_at_most_gain_a_step(
    controller: TauController, drops: list[float]
) -> None:
    assert controller.tau_min <= controller.tau <= controller.tau_max
    for drop in drops:
        before = controller.tau
        after = controller.update(drop)
        assert controller.tau_min <= after <= controller.tau_max
        assert abs(after - before) <= controller.gain * abs(controller.target - drop) + 1e-12


def reward_stream(seed: int, steps: int, groups: int = 16, group_size: int = 8, rewards: int = 3):
    """Independent N(0, 1) rewards: about 3/4 of the rollouts conflict (P(all K signs agree) = 2 / 2^K),
    with |ρ| spread over [0, 1), so every drop ratio up to ~0.75 is reachable by some τ."""
    generator = torch.Generator().manual_seed(seed)
    group_ids = torch.arange(groups).repeat_interleave(group_size)
    for _ in range(steps):
        yield torch.randn(len(group_ids), rewards, generator=generator, dtype=torch.float64), group_ids


def run(controller: TauController, steps: int = 80, seed: int = 0) -> tuple[list[float], list[float], float]:
    """(drop ratio per step, τ used per step, mean conflict ratio) with the controller choosing τ."""
    drops, taus, conflicts = [], [], []
    for rewards, group_ids in reward_stream(seed, steps):
        mask = torch.ones(len(group_ids), 4)
        metrics = compute_advantages("gd2po_snr", rewards, group_ids, mask, tau=controller.tau).metrics
        taus.append(controller.tau)
        drops.append(metrics["drop_ratio"])
        conflicts.append(metrics["conflict_ratio"])
        controller.update(metrics["drop_ratio"])
    return drops, taus, sum(conflicts) / len(conflicts)


REACH_STEPS = 10  # the trailing mean over 5 steps is within REACH_TOLERANCE of the target by this step
REACH_TOLERANCE = 0.05
SETTLED_TOLERANCE = 0.02  # the mean drop ratio of steps 20..80


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("start", [0.05, 0.8])
def test_drop_ratio_reaches_the_target_on_a_fixed_reward_stream(target: float, start: float) -> None:
    controller = TauController(target=target, gain=0.5, tau_min=0.0, tau_max=1.0, tau=start)
    drops, taus, _ = run(controller)
    trailing = [sum(drops[i - 4 : i + 1]) / 5 for i in range(4, len(drops))]
    reached = next(i + 4 for i, mean in enumerate(trailing) if abs(mean - target) <= REACH_TOLERANCE)
    assert reached <= REACH_STEPS, (reached, drops[:15])
    settled = drops[20:]
    assert abs(sum(settled) / len(settled) - target) <= SETTLED_TOLERANCE, settled
    assert all(0.0 <= tau <= 1.0 for tau in taus)


def test_an_unreachable_target_pins_tau_at_its_upper_bound() -> None:
    """Only conflicting rollouts can be dropped: a target above the conflict ratio ends at tau_max."""
    controller = TauController(target=0.95, gain=0.5, tau_min=0.2, tau_max=0.9, tau=0.5)
    _, taus, conflict = run(controller, steps=30)
    assert conflict < 0.95
    assert taus[-10:] == [0.9] * 10


def test_narrow_bounds_hold_while_the_target_pulls_outside_them() -> None:
    controller = TauController(target=0.05, gain=1.0, tau_min=0.4, tau_max=0.6, tau=0.6)
    _, taus, _ = run(controller, steps=30)
    assert min(taus) == 0.4 and max(taus) <= 0.6


@pytest.mark.parametrize(
    "settings",
    [
        {"tau_min": 0.7, "tau_max": 0.3},
        {"tau_min": -0.1},
        {"tau_max": 1.5},
        {"target": 1.2},
        {"gain": 0.0},
        {"gain": math.nan},
    ],
)
def test_bad_settings_are_refused(settings: dict) -> None:
    with pytest.raises(ValueError):
        TauController(**{"target": 0.3, "gain": 0.5, "tau_min": 0.0, "tau_max": 1.0, "tau": 0.5, **settings})


@pytest.mark.parametrize("drop", [math.nan, math.inf, -0.1, 1.5])
def test_a_drop_ratio_that_is_no_ratio_is_refused(drop: float) -> None:
    controller = TauController(target=0.3, gain=0.5, tau_min=0.0, tau_max=1.0, tau=0.5)
    with pytest.raises(ValueError, match="drop ratio"):
        controller.update(drop)
    assert controller.tau == 0.5


def config_with(advantage: dict) -> dict:
    return {
        "model": {"path": "/models/m"},
        "data": {"train_files": ["/data/train.parquet"]},
        "rewards": [{"name": "a", "url": "http://127.0.0.1:1"}, {"name": "b", "url": "http://127.0.0.1:2"}],
        "trainer": {"advantage": advantage},
    }


def test_config_accepts_adaptive_tau_on_gd2po_snr_only() -> None:
    adaptive = {"target_drop_ratio": 0.3}
    config = load_config(**config_with({"estimator": "gd2po_snr", "adaptive_tau": adaptive}))
    assert config.trainer.advantage.adaptive_tau.gain == 0.5
    for estimator in ("gdpo", "gd2po_hard"):
        with pytest.raises(ConfigError, match="adaptive_tau"):
            load_config(**config_with({"estimator": estimator, "adaptive_tau": adaptive}))
    # Without the filter nothing is dropped, so there is no drop ratio to steer.
    with pytest.raises(ConfigError, match="filter: false"):
        load_config(**config_with({"estimator": "gd2po_snr", "filter": False, "adaptive_tau": adaptive}))
    crossed = {"target_drop_ratio": 0.3, "tau_min": 0.9, "tau_max": 0.2}
    with pytest.raises(ConfigError, match="tau_min"):
        load_config(**config_with({"estimator": "gd2po_snr", "adaptive_tau": crossed}))
