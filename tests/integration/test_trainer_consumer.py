"""The trainer's Redis consumer against a real server: staleness drops, duplicate skips, undecodable
entries kept in the dead-letter stream, and pending entries reclaimed after a restart."""

from __future__ import annotations

import time

import pytest
import redis

from proto import Completion, ScoredGroup, encode
from proto.keys import RedisKeys
from trainer.consumer import Counts, GroupConsumer

pytestmark = pytest.mark.integration
KEYS = RedisKeys()


def group(group_id: str, version: int) -> ScoredGroup:
    completion = Completion(token_ids=[1, 2], logprobs=[-0.1, -0.2], text="ab", finish_reason="stop")
    return ScoredGroup(
        group_id=group_id,
        prompt_id="p",
        prompt_token_ids=[5],
        completions=[completion, completion],
        rewards={"a": [0.0, 1.0]},
        policy_version=version,
        created_at=time.time(),
        scored_at=time.time(),
    )


def test_stale_duplicate_and_undecodable_entries(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    consumer = GroupConsumer(client, KEYS, block_ms=50)
    client.sadd(KEYS.trained, "done")
    for g in (group("old", 0), group("done", 5), group("fresh", 4)):
        client.xadd(KEYS.groups, {"msg": encode(g)})
    client.xadd(KEYS.groups, {"msg": b"\x93garbage"})
    client.xadd(KEYS.groups, {"msg": encode(group("fresh2", 5))})
    counts = Counts()
    pulled = consumer.pull(2, current_version=5, max_staleness=2, counts=counts)
    assert [g.group_id for g in pulled.groups] == ["fresh", "fresh2"]
    assert (counts.stale, counts.duplicate, counts.undecodable) == (1, 1, 1)
    assert counts.staleness == [1, 0]
    assert client.sismember(KEYS.stale, "old") and not client.sismember(KEYS.trained, "old")
    assert client.xlen(KEYS.deadletter) == 1  # the undecodable bytes are kept, not dropped
    # Only the two groups to train on stay pending until commit.
    assert client.xpending(KEYS.groups, KEYS.trainer_group)["pending"] == 2
    consumer.commit(pulled)
    assert client.xpending(KEYS.groups, KEYS.trainer_group)["pending"] == 0
    assert client.smembers(KEYS.trained) == {b"done", b"fresh", b"fresh2"}


def test_pending_entries_are_reclaimed_after_a_restart(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    first = GroupConsumer(client, KEYS, consumer="trainer-old", block_ms=50)
    for name in ("g1", "g2", "g3"):
        client.xadd(KEYS.groups, {"msg": encode(group(name, 0))})
    taken = first.pull(2, current_version=0, max_staleness=1, counts=Counts())
    assert [g.group_id for g in taken.groups] == ["g1", "g2"]  # then the process dies without commit

    restarted = GroupConsumer(client, KEYS, block_ms=50)
    again = restarted.pull(3, current_version=0, max_staleness=1, counts=Counts())
    assert [g.group_id for g in again.groups] == ["g1", "g2", "g3"]  # reclaimed first, in order
    restarted.commit(again)
    assert client.xpending(KEYS.groups, KEYS.trainer_group)["pending"] == 0
