"""Informative batches in the real stack (``trainer.dynamic_sampling``): a synchronous run on the toy
policy whose only reward (the answer starts with a vowel) is often the same for a whole group of 4.

The trainer must keep asking the rollout for more groups at the version it is at (without the request a
synchronous rollout waits for new weights while the trainer waits for groups: a deadlock), skip and
acknowledge the groups without signal exactly once, stay on-policy, and stop on its sample budget
(``trainer.total_samples``) rather than its step count."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
import yaml
from stack_helpers import finish, start_gd2po_up, toy_learning_config

from gd2po.models import build_toy_policy
from gd2po.runlog import read_steps
from proto.keys import RedisKeys
from proto.stream import queue_state

pytestmark = pytest.mark.e2e
GROUP_SIZE, PROMPTS = 4, 4
BUDGET = 12 * PROMPTS * GROUP_SIZE  # samples: 12 steps' worth without skipping
OVERSAMPLE = 2.0
RUN_TIMEOUT_S = 300


def dynamic_sampling_config(tmp_path: Path) -> Path:
    path = toy_learning_config(tmp_path, build_toy_policy(tmp_path / "toy-policy"), steps=100)
    config = yaml.safe_load(path.read_text())
    config["synchronous"] = True
    config["redis"] = {"namespace": "dynamic-sampling"}
    config["rewards"] = [r for r in config["rewards"] if r["name"] == "vowel"]
    config["rollout"].update(group_size=GROUP_SIZE, prompts_per_batch=PROMPTS)
    config["trainer"].update(
        prompts_per_step=PROMPTS,
        total_samples=BUDGET,
        dynamic_sampling={"oversample": OVERSAMPLE},
        checkpoint={"every": 5},
    )
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_synchronous_run_skips_groups_without_signal_once_and_stops_on_its_sample_budget(
    tmp_path: Path, redis_url: str
) -> None:
    run_dir = tmp_path / "run"
    process = start_gd2po_up(dynamic_sampling_config(tmp_path), run_dir, {"GD2PO_REDIS__URL": redis_url})
    output = finish(process, RUN_TIMEOUT_S)
    assert process.returncode == 0, output[-4000:]
    steps = read_steps(run_dir)

    # Stopped on the budget: the last step crossed it, the one before had not.
    reads = [int(s["samples_read_total"]) for s in steps]
    assert reads[-1] >= BUDGET > (reads[-2] if len(reads) > 1 else 0)
    assert len(steps) < BUDGET // (PROMPTS * GROUP_SIZE), "no step skipped anything: the test has no teeth"
    for record in steps:
        read = record["groups_read"]
        assert PROMPTS <= read <= OVERSAMPLE * PROMPTS
        # A full step of informative groups, unless the read bound came first (then it says so).
        assert record["informative_groups"] == PROMPTS or read == OVERSAMPLE * PROMPTS, record
        assert record["staleness_mean"] == 0  # the extra batches were generated at the trainer's version
    assert steps[-1]["skipped_total"] > 0
    assert sum(s["skipped_generation_seconds"] for s in steps) > 0

    # Exactly once: every produced group the trainer read is in one ledger set — trained or skipped — none
    # is pending, and the rest is the batch the rollout made for the last version (never read).
    client, keys = redis.Redis.from_url(redis_url), RedisKeys("dynamic-sampling")
    sets = {
        name: {m.decode() for m in client.smembers(getattr(keys, name))} for name in ("trained", "skipped")
    }
    assert not sets["trained"] & sets["skipped"]
    assert len(sets["skipped"]) == steps[-1]["skipped_total"]
    trained_ids = [g for s in steps for g in s["group_ids"]]
    assert len(trained_ids) == len(set(trained_ids)) and set(trained_ids) == sets["trained"]
    queue = queue_state(client, keys)
    assert int(client.get(keys.produced)) == len(sets["trained"]) + len(sets["skipped"]) + queue.lag
    assert queue.pending == 0 and queue.lag <= PROMPTS
