"""Adaptive τ in the real trainer: each step uses the controller's τ, the next τ follows that step's drop
ratio by the controller's rule, the τ in use is exported, and a resumed run continues from the τ its
checkpoint saved instead of restarting from ``trainer.advantage.tau``."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from test_trainer_service import experiment, gauge
from trainer_data import generate_groups, push

from gd2po.runlog import read_steps
from trainer.service import Trainer

pytestmark = pytest.mark.integration
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions")
)
ADAPTIVE = {"target_drop_ratio": 0.6, "gain": 2.0, "tau_min": 0.1, "tau_max": 0.95}


def test_tau_follows_the_drop_ratio_and_survives_a_resume(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    push(redis_url, generate_groups(tiny_model_dir, 8, seed=7))
    advantage = {"estimator": "gd2po_snr", "tau": 0.3, "adaptive_tau": ADAPTIVE}
    config = experiment(
        tmp_path, tiny_model_dir, redis_url, 0, total_steps=2, advantage=advantage, checkpoint={"every": 1}
    )
    Trainer(config).run()
    resumed = config.model_copy(update={"trainer": config.trainer.model_copy(update={"total_steps": 4})})
    trainer = Trainer(resumed, resume=True)
    trainer.run()

    steps = read_steps(config.run.output_dir)
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    taus = [s["tau"] for s in steps]
    assert taus[0] == 0.3  # the configured start
    for before, after in itertools.pairwise(steps):  # across the resume (step 2 → 3) too
        expected = before["tau"] + ADAPTIVE["gain"] * (ADAPTIVE["target_drop_ratio"] - before["drop_ratio"])
        assert after["tau"] == pytest.approx(min(max(expected, 0.1), 0.95)), (before, after)
    assert len(set(taus)) > 1, taus  # the planted conflicts moved it
    last = steps[-1]
    next_tau = min(max(last["tau"] + 2.0 * (0.6 - last["drop_ratio"]), 0.1), 0.95)
    assert trainer.tau_controller.tau == pytest.approx(next_tau)
    assert gauge(generate_latest(trainer.metrics.registry).decode(), "gd2po_trainer_tau") == last["tau"]
