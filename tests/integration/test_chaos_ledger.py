"""The chaos run's ledger (bench/chaos_ledger.py) on a run written by the real producer and consumer
against a real Redis: a clean run reconciles, and each broken promise — a group lost, trained twice, a
score no reward service answered, a policy version going backwards, a run cut short — is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from trainer_data import tiny_group

from bench.chaos_ledger import reconcile
from proto import DeadLetter, ScoredGroup
from proto.audit import AuditedScore, AuditLog, produced_log_path, score_digest, score_log_path
from proto.keys import RedisKeys
from rollout_service.producer import Producer
from trainer.consumer import Counts, GroupConsumer

pytestmark = pytest.mark.integration
KEYS = RedisKeys()
STEPS = 3


def group(group_id: str, version: int) -> ScoredGroup:
    return tiny_group(group_id, version).model_copy(
        update={"producer_id": "rollout-a", "metadata": {"label": "x"}}
    )


def write_run(run_dir: Path, client: redis.Redis, *, versions=(0, 0, 1, 1, 2, 2, 2, 2)) -> list[ScoredGroup]:
    """8 groups published and 1 dead-lettered (audited), 6 of them trained two per step over 3 steps and
    committed, 2 left in the queue; every score logged by its "reward service"."""
    producer = Producer(client, KEYS, AuditLog(produced_log_path(run_dir, "rollout-a")))
    groups = [group(f"g{i}", v) for i, v in enumerate(versions)]
    for pair in range(0, len(groups), 2):
        producer.publish(groups[pair : pair + 2])
    scores = AuditLog(score_log_path(run_dir / "audit", "a"))
    scores.append(
        [
            AuditedScore("a", score_digest(c.text, "x"), s, 0.0)
            for g in groups
            for c, s in zip(g.completions, g.rewards["a"], strict=True)
        ]
    )
    # One more group whose reward failed: dead-lettered by the rollout, with the scores that did come.
    failed = group("g-dead", versions[-1])
    producer.dead_letter(
        [
            DeadLetter(
                kind="reward_failed",
                reason="b: failed after 3 attempts",
                source="rollout",
                failed_rewards=["b"],
                **failed.model_dump(
                    include={
                        "group_id",
                        "prompt_id",
                        "completions",
                        "rewards",
                        "policy_version",
                        "producer_id",
                        "metadata",
                    }
                ),
            )
        ]
    )
    consumer = GroupConsumer(client, KEYS, block_ms=50)
    with (run_dir / "metrics.jsonl").open("w") as log:
        for step in range(1, STEPS + 1):
            pulled = consumer.pull(2, current_version=step - 1, max_staleness=5, counts=Counts())
            consumer.commit(pulled)
            ids = [g.group_id for g in pulled.groups]
            log.write(json.dumps({"step": step, "policy_version": step, "group_ids": ids}) + "\n")
    return groups


@pytest.fixture
def run(tmp_path: Path, redis_url: str):
    client = redis.Redis.from_url(redis_url)
    groups = write_run(tmp_path, client)
    yield tmp_path, client, groups
    client.close()


def test_a_clean_run_reconciles(run) -> None:
    run_dir, client, _ = run
    ledger = reconcile(run_dir, client, KEYS, STEPS)
    assert ledger.ok, ledger.problems
    assert (ledger.produced, ledger.trained, ledger.left_in_queue, ledger.stale) == (9, 6, 2, 0)
    assert ledger.dead == {"reward_failed": 1}
    assert ledger.scores_checked == 18 and not ledger.lost and not ledger.fabricated


def test_a_group_lost_by_redis_is_named(run) -> None:
    run_dir, client, _ = run
    last_entry = client.xrange(KEYS.groups, "-", "+")[-1][0]
    client.xdel(KEYS.groups, last_entry)  # acknowledged to the producer, gone after a restart
    ledger = reconcile(run_dir, client, KEYS, STEPS)
    assert ledger.lost == ["g7"]
    assert any("1 group(s) lost" in p for p in ledger.problems)


def test_a_group_read_but_never_settled_is_lost(run) -> None:
    run_dir, client, _ = run
    GroupConsumer(client, KEYS, block_ms=50).pull(2, 2, 5, Counts())  # read, never committed
    ledger = reconcile(run_dir, client, KEYS, STEPS)
    assert sorted(ledger.lost) == ["g6", "g7"]


def test_a_group_trained_twice_is_named(run) -> None:
    run_dir, client, _ = run
    with (run_dir / "metrics.jsonl").open("a") as log:  # a fourth step trains g0 again
        log.write(json.dumps({"step": STEPS + 1, "policy_version": STEPS + 1, "group_ids": ["g0"]}) + "\n")
    ledger = reconcile(run_dir, client, KEYS, STEPS + 1)
    assert ledger.trained_twice == ["g0"]
    assert not ledger.ok


def test_a_step_logged_again_after_a_crash_counts_once(run) -> None:
    """The trainer died after logging step 3 and before its checkpoint: step 3 is trained and logged
    again; only the second record is in the model."""
    run_dir, client, _ = run
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([*lines, lines[-1]]) + "\n")
    assert reconcile(run_dir, client, KEYS, STEPS).ok


def test_a_score_no_reward_service_answered_is_fabricated(run) -> None:
    run_dir, client, groups = run
    fabricated = groups[0].model_copy(update={"group_id": "g-fake", "rewards": {"a": [0.0, 0.5]}})
    Producer(client, KEYS, AuditLog(produced_log_path(run_dir, "rollout-a"))).publish([fabricated])
    ledger = reconcile(run_dir, client, KEYS, STEPS)
    assert ledger.fabricated == ["g-fake/a=0.5"]
    assert not ledger.ok


def test_a_policy_version_going_backwards_is_named(tmp_path: Path, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    write_run(tmp_path, client, versions=(0, 0, 2, 2, 1, 1, 2, 2))
    ledger = reconcile(tmp_path, client, KEYS, STEPS)
    assert ledger.rollout_version_regressions == ["g4: v1 after v2", "g5: v1 after v2"]
    assert not ledger.ok
    client.close()


def test_a_run_short_of_its_steps_is_named(run) -> None:
    run_dir, client, _ = run
    ledger = reconcile(run_dir, client, KEYS, STEPS + 5)
    assert f"the trainer reached step {STEPS} of {STEPS + 5}" in ledger.problems


def test_groups_no_producer_logged_are_accounted_and_bounded(run) -> None:
    """A rollout killed between Redis' reply and its log append leaves a group only Redis knows: it is
    classified like the others, and more of them than the kills can explain is named."""
    run_dir, client, _ = run
    Producer(client, KEYS).publish([group("g-unlogged", 3)])  # no audit log: as if killed before it
    ledger = reconcile(run_dir, client, KEYS, STEPS, max_unlogged=1)
    assert ledger.ok, ledger.problems
    assert (ledger.unlogged, ledger.left_in_queue) == (1, 3)
    ledger = reconcile(run_dir, client, KEYS, STEPS, max_unlogged=0)
    assert any("no producer logged" in p for p in ledger.problems)
