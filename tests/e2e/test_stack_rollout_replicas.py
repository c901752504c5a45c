"""`gd2po up` with ``rollout.replicas: 2`` and ``trainer.publish.transport: broadcast`` on the tiny model:
two vLLM rollout services share one prompt order through Redis (no prompt generated twice within an
epoch); each receives every new policy over its own gloo group with the trainer (a folder only every few
versions); the trainer accounts staleness per replica (metrics.jsonl and /metrics); kill -9 of one
replica leaves the trainer and the other replica going, and the restarted replica comes back on the
trainer's newest policy — no replica's policy version ever goes backwards."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import yaml
from stack_helpers import (
    finish,
    processes_in_session,
    start_gd2po_up,
    steps_logged,
    tiny_stack_config,
    wait_for_manifest,
)
from test_stack_e2e import produced_groups

from gd2po.runlog import read_steps
from proto.restarts import read_restarts

pytestmark = pytest.mark.e2e
STEPS = 60  # long enough for the killed replica to restart and receive a policy before the run ends
REPLICAS = ("rollout-0", "rollout-1")


def metric(url: str, name: str, **labels: str) -> float | None:
    try:
        text = httpx.get(f"{url}/metrics", timeout=2).text
    except httpx.TransportError:
        return None
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return None


def test_two_rollout_replicas_share_prompts_receive_broadcasts_and_survive_a_kill(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    config_path = tiny_stack_config(tmp_path, tiny_model_dir, steps=STEPS)
    config = yaml.safe_load(config_path.read_text())
    config["rollout"]["replicas"] = 2
    config["trainer"]["publish"] = {
        "transport": "broadcast",
        "broadcast": {"timeout": 10, "disk_every": 4, "bucket_mib": 4},
    }
    config_path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    process = start_gd2po_up(config_path, run_dir, {"GD2PO_REDIS__URL": redis_url})
    manifest = wait_for_manifest(run_dir, process, timeout=300)
    services = {s["name"]: s for s in manifest["services"]}
    assert set(REPLICAS) <= set(services) and "rollout" not in services
    trainer_url, victim = services["trainer"]["url"], services["rollout-1"]

    # Kill rollout-1 once both replicas serve a received policy and the trainer is a few steps in; then
    # watch it come back and receive a newer policy than the trainer had when it died.
    killed_version = back_version = None
    transfers_ok = 0.0
    deadline = time.monotonic() + 900
    while process.poll() is None and time.monotonic() < deadline:
        transfers_ok = max(
            transfers_ok, metric(trainer_url, "gd2po_trainer_weight_transfers_total", outcome="ok") or 0
        )
        versions = {r: metric(services[r]["url"], "gd2po_rollout_policy_version") or 0 for r in REPLICAS}
        trainer_version = metric(trainer_url, "gd2po_trainer_policy_version") or 0
        if killed_version is None and steps_logged(run_dir) >= 3 and min(versions.values()) >= 1:
            killed_version = trainer_version
            os.killpg(victim["pid"], signal.SIGKILL)
        elif killed_version is not None and back_version is None:
            restarted = any(r.child == "rollout-1" for r in read_restarts(run_dir) or [])
            if restarted and versions["rollout-1"] > killed_version:
                back_version = versions["rollout-1"]
        time.sleep(0.3)
    output = finish(process, timeout=120)
    assert process.returncode == 0, output[-4000:]
    assert killed_version is not None, f"both replicas never served a received policy:\n{output[-3000:]}"
    assert back_version is not None, "the restarted rollout-1 never served a policy newer than at its kill"

    # Weights went over the process group: transfers served, each replica logged receiving them, and the
    # folder was written only every disk_every publishes (versions 1, 5, 9, …) and for the final policy.
    assert transfers_ok >= 4, transfers_ok
    logs = {r: (run_dir / "logs" / f"{r}.log").read_text() for r in REPLICAS}
    assert all("received from the trainer" in log for log in logs.values())
    steps_folders = {int(p.name.split("-")[1]) for p in (run_dir / "weights").glob("step-*")}
    assert max(steps_folders) == STEPS, steps_folders  # the trainer's close wrote the final version
    assert all(step % 4 == 1 for step in steps_folders - {STEPS}), steps_folders

    # Both replicas generated; per replica the policy version never went backwards (kill and restart
    # included); one shared prompt order: within the first epoch (399 prompts) no prompt twice.
    groups = produced_groups(redis_url)
    for replica in REPLICAS:
        versions = [g.policy_version for g in groups if g.producer_id == replica]
        assert versions and max(versions) >= 1, (replica, versions)
        assert versions == sorted(versions), (replica, versions)
    prompt_ids = [g.prompt_id for g in groups]
    assert len(prompt_ids) < 390 and len(set(prompt_ids)) == len(prompt_ids), sorted(prompt_ids)

    # The trainer ran every step and accounted staleness per replica.
    logged = read_steps(run_dir)
    assert [int(s["step"]) for s in logged] == list(range(1, STEPS + 1))
    per_replica = {
        r: [s[f"producer_staleness_mean/{r}"] for s in logged if f"producer_staleness_mean/{r}" in s]
        for r in REPLICAS
    }
    assert all(per_replica.values()), per_replica
    assert all(0 <= age <= 2 for ages in per_replica.values() for age in ages)  # trainer.max_staleness: 2
    trained_ids = {gid for s in logged for gid in s["group_ids"]}
    assert {g.producer_id for g in groups if g.group_id in trained_ids} == set(REPLICAS)

    time.sleep(0.5)
    final = json.loads((run_dir / "services.json").read_text())["services"]
    leftovers = {s["name"]: processes_in_session(s["pid"]) for s in final}
    assert not any(leftovers.values()), leftovers
