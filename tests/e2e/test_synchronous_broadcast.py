"""A synchronous run over the broadcast transport, in the real stack (`gd2po up`, toy policy): most
versions are only offered over a process group (a folder every 3rd), and the first publish fails on the
disk (an injected fault). Both used to deadlock: the rollout waited for a folder announcement, or for a
new version after the failed publish, while the trainer waited for groups. The run must train all its
steps on-policy, the failed publish costing one version and the offered versions arriving over gloo."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from stack_helpers import finish, start_gd2po_up, toy_learning_config

from gd2po.models import build_toy_policy
from gd2po.runlog import read_steps
from trainer.publisher import FAULT_PUBLISH_ENV

pytestmark = pytest.mark.e2e
STEPS = 8
RUN_TIMEOUT_S = 300


def test_a_synchronous_run_takes_offered_versions_and_survives_a_failed_publish(
    tmp_path: Path, redis_url: str
) -> None:
    path = toy_learning_config(tmp_path, build_toy_policy(tmp_path / "toy-policy"), steps=STEPS)
    config = yaml.safe_load(path.read_text())
    config["synchronous"] = True
    config["redis"] = {"namespace": "synchronous-broadcast"}
    config["trainer"]["max_staleness"] = 0
    config["trainer"]["publish"] = {
        "transport": "broadcast",
        "broadcast": {"timeout": 10, "disk_every": 3, "bucket_mib": 4},
    }
    path.write_text(yaml.safe_dump(config))
    fault = tmp_path / "fail-next-publish"
    fault.touch()  # the first publish (its folder) fails
    run_dir = tmp_path / "run"
    env = {"GD2PO_REDIS__URL": redis_url, FAULT_PUBLISH_ENV: str(fault)}
    process = start_gd2po_up(path, run_dir, env)
    output = finish(process, RUN_TIMEOUT_S)
    assert process.returncode == 0, output[-4000:]

    steps = read_steps(run_dir)
    assert len(steps) == STEPS
    assert not fault.exists() and steps[-1]["publish_failures_total"] == 1
    # Step 1's publish failed (still version 0), then one version a step; every group sampled at the
    # version the trainer was at (max_staleness 0 would have dropped any other).
    assert [s["policy_version"] for s in steps] == [0, *range(1, STEPS)]
    assert all(s["staleness_mean"] == 0 and s["stale_dropped_total"] == 0 for s in steps)
    log = (run_dir / "logs" / "rollout.log").read_text()
    received = [line for line in log.splitlines() if "received from the trainer over gloo" in line]
    assert len(received) >= 3, log[-3000:]  # versions that were never a folder came over gloo
