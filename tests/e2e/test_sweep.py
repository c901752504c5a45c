"""`gd2po sweep` runs a grid of whole stacks: two estimators × two seeds of the toy learning task (4 steps
each), one `gd2po up` per run folder, each with the estimator and seed of its arm — the base config's
GD²PO-SNR option (``tau``) left behind when the arm switches to an estimator that does not take it — and
ends with a comparison whose arms are the two estimators, each a band across its two seeds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import yaml
from stack_helpers import REPO_ROOT, toy_learning_config

from gd2po.models import build_toy_policy
from gd2po.runlog import read_steps

pytestmark = pytest.mark.e2e
STEPS = 4
# Four whole stacks one after the other: ~2 min on an idle 2-core machine, 9–10 min niced under load 7–12.
# The subprocess gives up before pytest's own timeout so the failure says so.
SWEEP_TIMEOUT_S = 840


@pytest.mark.timeout(SWEEP_TIMEOUT_S + 60)
def test_a_sweep_runs_every_arm_and_seed_through_the_stack_and_compares_them(tmp_path: Path) -> None:
    model_dir = build_toy_policy(tmp_path / "toy-policy")
    config = toy_learning_config(tmp_path, model_dir, steps=STEPS)
    base = yaml.safe_load(config.read_text())
    base["trainer"]["advantage"] = {"estimator": "gd2po_snr", "tau": 0.9}  # an option only SNR takes
    config.write_text(yaml.safe_dump(base))
    sweep_dir = tmp_path / "sweep"
    # No GD2PO_REDIS__URL: each run starts its private Redis, as `gd2po up` does (one shared database
    # would hand a run the groups its predecessor left).
    env = {k: v for k, v in os.environ.items() if k not in ("GD2PO_REDIS__URL", "REDIS_URL")}
    result = subprocess.run(
        [
            *(sys.executable, "-m", "gd2po.cli", "sweep", str(config), "--seeds", "2"),
            *("--vary", "trainer.advantage.estimator=grpo,gd2po_hard", "--out", str(sweep_dir)),
            # Unpinned: the test is not about placement, and on a shared machine a child pinned to a
            # core that a foreign process saturates starves there (nice 19 behind nice 0).
            *("--no-progress", "--no-auto-pin"),
            # gd2po up's restart policy reaches every run: with "no", a run keeps no restart log.
            *("--restart", "no"),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SWEEP_TIMEOUT_S,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "run 4/4 · estimator=gd2po_hard · seed 1" in output

    observed = {}
    for estimator in ("grpo", "gd2po_hard"):
        for seed in (0, 1):
            run_dir = sweep_dir / f"estimator={estimator}" / f"seed-{seed}"
            assert not (run_dir / "restarts.jsonl").exists(), "--restart no did not reach the run"
            effective = yaml.safe_load((run_dir / "config.yaml").read_text())
            assert effective["trainer"]["advantage"]["estimator"] == estimator
            assert "tau" not in effective["trainer"]["advantage"]
            assert effective["run"]["seed"] == seed
            steps = read_steps(run_dir)
            assert [int(s["step"]) for s in steps] == list(range(1, STEPS + 1))
            keep = [s["keep_ratio"] for s in steps]
            if estimator == "grpo":
                assert keep == [1.0] * STEPS  # GRPO filters nothing
            else:
                assert min(keep) < 1.0, "GD²PO-Hard dropped no rollout: the arm did not run its estimator"
            observed[estimator, seed] = [
                (s["reward_mean/short"], s["reward_mean/vowel"], s["conflict_ratio"]) for s in steps
            ]
    # The seed reached the run: the two seeds of an arm sampled different batches (prompt order and
    # sampling), while the same seed of both arms drew the same first batch from the same start.
    assert observed["grpo", 0] != observed["grpo", 1]
    assert observed["grpo", 0][0] == observed["gd2po_hard", 0][0]

    text = (sweep_dir / "comparison" / "comparison.txt").read_text()
    for arm in ("estimator=grpo · grpo × 2 seeds", "estimator=gd2po_hard · gd2po_hard × 2 seeds"):
        assert arm in text
    assert "[min, max] across seeds" in text
    image = matplotlib.image.imread(sweep_dir / "comparison" / "comparison.png")
    assert image.shape[0] > 200 and image.shape[1] > 600
