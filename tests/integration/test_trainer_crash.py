"""kill -9 the trainer mid-run and restart it with --resume: every group produced ends up trained
exactly once — in the Redis ledger and in the steps the final model actually went through — even when
the stream holds second copies of groups (before and after the crash, committed or not) and groups the
trainer cannot train, which are dead-lettered once and never crash it."""

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

from proto import Completion
from proto.deadletter import raw_bytes, read_dead_letters
from proto.keys import RedisKeys
from proto.stream import entry_fields

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


def write_config(tmp_path: Path, tiny_model_dir: Path, redis_url: str, **trainer) -> Path:
    """The experiment of these tests: a tiny model, 2 prompts a step, a checkpoint every 2 steps."""
    config = tmp_path / "exp.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run": {"output_dir": str(tmp_path / "run")},
                "redis": {"url": redis_url},
                "model": {"path": str(tiny_model_dir)},
                "rewards": [
                    {"name": "a", "url": "http://127.0.0.1:1"},
                    {"name": "b", "url": "http://127.0.0.1:1"},
                ],
                "trainer": {
                    "total_steps": 5,
                    "prompts_per_step": 2,
                    "checkpoint": {"every": 2},
                    "max_staleness": 100,
                    "lr": 1e-4,
                    "metrics_port": 0,
                    "deepspeed": {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8},
                    **trainer,
                },
            }
        )
    )
    return config


def test_kill_9_then_resume_trains_every_group_exactly_once(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, tiny_model_dir, redis_url)
    groups = generate_groups(tiny_model_dir, 10, seed=7)
    no_b = groups[0].model_copy(update={"group_id": "poison-no-b", "rewards": {"a": groups[0].rewards["a"]}})
    sampled = groups[1].completions[0]
    outside = Completion(
        token_ids=[*sampled.token_ids[:-1], 10**6], logprobs=sampled.logprobs, text="", finish_reason="length"
    )
    vocab = groups[1].model_copy(update={"group_id": "poison-vocab", "completions": [outside] * 4})
    client = redis.Redis.from_url(redis_url)
    # Three steps' worth, the trainer then waits for more. Step 1 trains g0, g1; step 2 meets the second
    # copy of g0 (pulled in step 1, not yet committed: same checkpoint window) and trains g2, g3; step 3
    # meets two groups it cannot train and undecodable bytes, trains g4 and skips g4's second copy.
    push(redis_url, [*groups[:2], groups[0], *groups[2:4], no_b, vocab])
    client.xadd(KEYS.groups, entry_fields(b"\x93garbage"))
    push(redis_url, [groups[4], groups[4], groups[5]])

    first = start_trainer(config)
    deadline = time.monotonic() + 300
    while len(journal(run_dir)) < 3:
        assert first.poll() is None, first.communicate()[0]
        assert time.monotonic() < deadline, "trainer too slow"
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(first.pid, signal.SIGKILL)  # step 3 trained, not checkpointed, not acknowledged
    first.wait()

    assert client.scard(KEYS.trained) == 4  # only what checkpoint step-2 holds
    assert client.xpending(KEYS.groups, KEYS.trainer_group)["pending"] == 2  # g4, g5; never a copy
    assert client.xlen(KEYS.deadletter) == 3
    assert [
        (r["duplicates_total"], r["untrainable_total"], r["undecodable_total"]) for r in journal(run_dir)
    ] == [
        (0, 0, 0),
        (1, 0, 0),
        (2, 2, 1),
    ]

    # After the crash: copies of g5 (pending: redelivered and trained again at step 3), of g1 (committed)
    # and of a dead-lettered group, between the last four groups.
    push(redis_url, [groups[6], groups[5], groups[7], groups[1], groups[8], vocab, groups[9]])
    second = start_trainer(config, "--resume")
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output

    produced = {g.group_id for g in groups}
    assert {m.decode() for m in client.smembers(KEYS.trained)} == produced
    assert {m.decode() for m in client.smembers(KEYS.dead)} == {"poison-no-b", "poison-vocab"}
    assert client.scard(KEYS.stale) == 0
    assert client.xpending(KEYS.groups, KEYS.trainer_group)["pending"] == 0
    letters = [letter for _, letter in read_dead_letters(client, KEYS)]  # each once, none again after resume
    assert [(x.kind, x.group_id) for x in letters] == [
        ("untrainable", "poison-no-b"),
        ("untrainable", "poison-vocab"),
        ("undecodable", None),
    ]
    assert raw_bytes(letters[2]) == b"\x93garbage"

    records = journal(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 3, 4, 5]  # step 3 was redone after the crash
    assert records[-1]["duplicates_total"] == 3  # the copies of g5, g1 and poison-vocab
    effective = {r["step"]: r["group_ids"] for r in records}  # the later record of a step wins
    lineage = [gid for step in sorted(effective) for gid in effective[step]]
    assert sorted(lineage) == sorted(produced)  # each group in the final model's history exactly once
    assert records[2]["group_ids"] == records[3]["group_ids"]  # the redelivered groups, in order


def test_a_step_the_trainer_dies_in_three_times_is_dead_lettered_and_the_run_finishes(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    """A step whose groups kill the trainer (here kill -9 while it learns on them, as the OOM killer
    would) would be redelivered after every restart, forever. Right: after the third death in that step
    the next trainer dead-letters its two groups (kind crashed_trainer) and trains the other groups to the
    end; every group ends in exactly one ledger set."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, tiny_model_dir, redis_url, total_steps=3)
    groups = generate_groups(tiny_model_dir, 8, seed=3)
    push(redis_url, groups)
    client = redis.Redis.from_url(redis_url)
    first_step = {g.group_id.encode() for g in groups[:2]}
    deaths = 0

    def in_the_first_step() -> bool:  # the restart has counted the deaths so far and is learning again
        counted = int(client.hget(KEYS.step_crashes, groups[0].group_id) or 0)
        return counted == deaths and client.smembers(KEYS.in_step) == first_step

    while deaths < 3:  # a kill that lands outside the update (publish, commit) counts no death: again
        trainer = start_trainer(config, "--resume")
        deadline = time.monotonic() + 300
        while not in_the_first_step():
            assert trainer.poll() is None, trainer.communicate()[0]
            assert time.monotonic() < deadline, "the trainer never reached its first step"
            time.sleep(0.002)
        os.killpg(trainer.pid, signal.SIGKILL)
        trainer.wait()
        deaths += client.smembers(KEYS.in_step) == first_step
        assert client.scard(KEYS.trained) == 0  # the first checkpoint (step 2) was never reached

    last = start_trainer(config, "--resume")
    output, _ = last.communicate(timeout=300)
    assert last.returncode == 0, output
    letters = [letter for _, letter in read_dead_letters(client, KEYS)]
    assert sorted((x.kind, x.group_id) for x in letters) == [
        ("crashed_trainer", g.group_id) for g in groups[:2]
    ]
    assert all("died 3 times" in x.reason for x in letters)
    assert {m.decode() for m in client.smembers(KEYS.trained)} == {g.group_id for g in groups[2:8]}
    assert client.hgetall(KEYS.step_crashes) == {} and not client.exists(KEYS.in_step)
    assert client.xpending(KEYS.groups, KEYS.trainer_group)["pending"] == 0
    records = journal(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["crashed_trainer_total"] == 2
    assert records[0]["group_ids"] == [g.group_id for g in groups[2:4]]
