"""kill -9 the trainer mid-run and restart it with --resume: every group produced ends up trained
exactly once — in the Redis ledger and in the steps the final model actually went through."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import yaml
from trainer_data import generate_groups, push

from proto.keys import RedisKeys

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
KEYS = RedisKeys()


def journal(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def start_trainer(config: Path, *extra: str) -> subprocess.Popen:
    # A fresh single-process trainer: not the rendezvous of a trainer an earlier test ran in this process.
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["TORCH_EXTENSIONS_DIR"] = str(REPO / ".cache" / "torch_extensions")
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", "--config", str(config), *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_kill_9_then_resume_trains_every_group_exactly_once(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    run_dir = tmp_path / "run"
    config = tmp_path / "exp.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run": {"output_dir": str(run_dir)},
                "redis": {"url": redis_url},
                "model": {"path": str(tiny_model_dir)},
                "rewards": [
                    {"name": "a", "url": "http://127.0.0.1:1"},
                    {"name": "b", "url": "http://127.0.0.1:1"},
                ],
                "trainer": {
                    "total_steps": 5,
                    "prompts_per_step": 2,
                    "save_every": 2,
                    "max_staleness": 100,
                    "lr": 1e-4,
                    "metrics_port": 0,
                    "deepspeed": {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8},
                },
            }
        )
    )
    groups = generate_groups(tiny_model_dir, 10, seed=7)
    push(redis_url, groups[:6])  # three steps' worth: the trainer then waits for more

    first = start_trainer(config)
    deadline = time.monotonic() + 300
    while len(journal(run_dir)) < 3:
        assert first.poll() is None, first.communicate()[0]
        assert time.monotonic() < deadline, "trainer too slow"
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(first.pid, signal.SIGKILL)  # step 3 trained, not checkpointed, not acknowledged
    first.wait()

    client = redis.Redis.from_url(redis_url)
    assert client.scard(KEYS.trained) == 4  # only what checkpoint step-2 holds
    assert client.xpending(KEYS.groups, KEYS.trainer_group)["pending"] == 2

    push(redis_url, groups[6:])
    second = start_trainer(config, "--resume")
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output

    produced = {g.group_id for g in groups}
    assert {m.decode() for m in client.smembers(KEYS.trained)} == produced
    assert client.scard(KEYS.stale) == 0 and client.scard(KEYS.dead) == 0
    assert client.xpending(KEYS.groups, KEYS.trainer_group)["pending"] == 0

    records = journal(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 3, 4, 5]  # step 3 was redone after the crash
    effective = {r["step"]: r["group_ids"] for r in records}  # the later record of a step wins
    lineage = [gid for step in sorted(effective) for gid in effective[step]]
    assert sorted(lineage) == sorted(produced)  # each group in the final model's history exactly once
    assert records[2]["group_ids"] == records[3]["group_ids"]  # the redelivered groups, in order
