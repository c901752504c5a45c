"""The trainer's Redis consumer against a real server: staleness drops, duplicate skips (ledger, same
pull, same checkpoint window), groups that cannot be trained and undecodable entries dead-lettered in
the one DeadLetter shape and acknowledged, pending entries reclaimed after a restart, and the groups of a
step the trainer keeps dying in dead-lettered at ``trainer.max_crashes_per_group``."""

from __future__ import annotations

import base64
import math

import msgpack
import pytest
import redis
from trainer_data import tiny_group

from proto import Completion, ScoredGroup, encode
from proto.deadletter import raw_bytes, read_dead_letters
from proto.keys import RedisKeys
from proto.stream import entry_fields
from trainer.batching import GroupRules
from trainer.consumer import Counts, GroupConsumer, Pulled

pytestmark = pytest.mark.integration
KEYS = RedisKeys()


group = tiny_group


def test_stale_duplicate_and_undecodable_entries(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    consumer = GroupConsumer(client, KEYS, block_ms=50)
    client.sadd(KEYS.trained, "done")
    for g in (group("old", 0), group("done", 5), group("fresh", 4)):
        client.xadd(KEYS.groups, entry_fields(encode(g)))
    client.xadd(KEYS.groups, entry_fields(b"\x93garbage"))
    client.xadd(KEYS.groups, entry_fields(encode(group("fresh2", 5))))
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
        client.xadd(KEYS.groups, entry_fields(encode(group(name, 0))))
    taken = first.pull(2, current_version=0, max_staleness=1, counts=Counts())
    assert [g.group_id for g in taken.groups] == ["g1", "g2"]  # then the process dies without commit

    restarted = GroupConsumer(client, KEYS, block_ms=50)
    again = restarted.pull(3, current_version=0, max_staleness=1, counts=Counts())
    assert [g.group_id for g in again.groups] == ["g1", "g2", "g3"]  # reclaimed first, in order
    restarted.commit(again)
    assert client.xpending(KEYS.groups, KEYS.trainer_group)["pending"] == 0


def pending(client: redis.Redis) -> int:
    return client.xpending(KEYS.groups, KEYS.trainer_group)["pending"]


def test_a_second_copy_of_a_group_is_skipped_acknowledged_and_counted(redis_url: str) -> None:
    """Two copies of one encoded group (a producer's XADD pipeline retried after a lost EXEC reply): in
    one pull, in a later pull of the same checkpoint window (pulled, not committed), after the commit, and
    copies of groups already dropped as stale or dead-lettered. Right: only the first copy trains; every
    other copy is acknowledged at once and counted in ``duplicate``."""
    client = redis.Redis.from_url(redis_url)
    consumer = GroupConsumer(client, KEYS, block_ms=50)
    counts = Counts()
    first = encode(group("g1", 5))
    for payload in (first, first, encode(group("g2", 5))):
        client.xadd(KEYS.groups, entry_fields(payload))
    step1 = consumer.pull(2, current_version=5, max_staleness=2, counts=counts)
    assert [g.group_id for g in step1.groups] == ["g1", "g2"]
    assert counts.duplicate == 1 and pending(client) == 2  # the copy is acknowledged, g1's first is not

    # Step 2 of the same checkpoint window: g1 and g2 are pulled, not committed.
    for payload in (encode(group("g2", 5)), first, encode(group("g3", 5))):
        client.xadd(KEYS.groups, entry_fields(payload))
    step2 = consumer.pull(1, current_version=5, max_staleness=2, counts=counts)
    assert [g.group_id for g in step2.groups] == ["g3"]
    assert counts.duplicate == 3 and pending(client) == 3

    consumer.commit(step1)
    consumer.commit(step2)
    client.sadd(KEYS.dead, "dead-by-rollout")
    for payload in (
        first,
        encode(group("old", 0)),
        encode(group("old", 0)),
        encode(group("dead-by-rollout", 5)),
    ):
        client.xadd(KEYS.groups, entry_fields(payload))
    client.xadd(KEYS.groups, entry_fields(encode(group("g4", 5))))
    step3 = consumer.pull(1, current_version=5, max_staleness=2, counts=counts)
    assert [g.group_id for g in step3.groups] == ["g4"]
    assert (counts.duplicate, counts.stale) == (6, 1)  # the second "old" is a copy, not a second drop
    assert pending(client) == 1
    assert client.smembers(KEYS.trained) == {b"g1", b"g2", b"g3"}


def poisoned(group_id: str, **changes) -> ScoredGroup:
    return group(group_id, 5).model_copy(update=changes)


RULES = GroupRules(reward_names=("a",), vocab_size=100, max_positions=64)


def test_groups_that_cannot_be_trained_are_dead_lettered_and_training_goes_on(redis_url: str) -> None:
    """Groups that decode but would crash the step (a configured reward missing, a token id outside the
    vocabulary, longer than the model's context, only empty responses) and entries that do not decode: each goes to the
    dead-letter stream in the one DeadLetter shape with the reason, its id to the ``dead`` ledger, its
    entry is acknowledged (a restart does not see it again), and the pull still returns fresh groups."""
    client = redis.Redis.from_url(redis_url)
    consumer = GroupConsumer(client, KEYS, block_ms=50, rules=RULES)
    long = Completion(token_ids=[1] * 64, logprobs=[-0.1] * 64, text="x", finish_reason="length")
    outside = Completion(token_ids=[1, 100], logprobs=[-0.1, -0.2], text="ab", finish_reason="stop")
    empty = Completion(token_ids=[], logprobs=[], text="", finish_reason="stop")
    bad = {
        "no-a": poisoned("no-a", rewards={"b": [0.0, 1.0]}),
        "prompt-vocab": poisoned("prompt-vocab", prompt_token_ids=[5, 2**40]),
        "answer-vocab": poisoned("answer-vocab", completions=[outside, outside]),
        "too-long": poisoned("too-long", completions=[long, long]),
        "all-empty": poisoned("all-empty", completions=[empty, empty]),
    }
    envelope = msgpack.unpackb(encode(group("nan", 5)))
    envelope["body"]["rewards"]["a"][0] = math.nan
    undecodable = {"garbage": b"\x93garbage", "nan": msgpack.packb(envelope)}
    client.xadd(KEYS.groups, entry_fields(encode(group("fresh", 5))))
    for poison in bad.values():
        client.xadd(KEYS.groups, entry_fields(encode(poison)))
    for payload in undecodable.values():
        client.xadd(KEYS.groups, entry_fields(payload))
    client.xadd(KEYS.groups, {"other": b"no message field"})
    client.xadd(KEYS.groups, entry_fields(encode(group("fresh2", 5))))

    counts = Counts()
    pulled = consumer.pull(2, current_version=5, max_staleness=2, counts=counts)
    assert [g.group_id for g in pulled.groups] == ["fresh", "fresh2"]
    assert (counts.untrainable, counts.undecodable, counts.duplicate) == (5, 3, 0)
    assert pending(client) == 2  # only the two to train on wait for their commit

    letters = {letter.group_id or letter.reason: letter for _, letter in read_dead_letters(client, KEYS)}
    assert len(letters) == 8
    assert "rewards lack ['a']" in letters["no-a"].reason
    assert "token id 1099511627776, outside the model's vocabulary of 100" in letters["prompt-vocab"].reason
    assert "completions[0].token_ids holds token id 100" in letters["answer-vocab"].reason
    assert "65 tokens, longer than the model's context of 64" in letters["too-long"].reason
    assert "every completion is empty" in letters["all-empty"].reason
    for group_id, poison in bad.items():
        letter = letters[group_id]
        assert (letter.kind, letter.source) == ("untrainable", "trainer")
        # The whole group is kept: it re-validates as the ScoredGroup that was produced.
        kept = letter.model_dump(include=set(ScoredGroup.model_fields))
        assert ScoredGroup.model_validate(kept) == poison
    assert letters["nan"].kind == "undecodable" and "finite" in letters["nan"].reason
    assert raw_bytes(letters["nan"]) == undecodable["nan"]  # the bytes as they were, to inspect
    garbage = next(v for v in letters.values() if v.group_id is None and raw_bytes(v) == b"\x93garbage")
    assert garbage.kind == "undecodable" and garbage.entry_id
    no_field = next(v for v in letters.values() if "has no" in v.reason)
    assert msgpack.unpackb(raw_bytes(no_field)) == {b"other": b"no message field"}
    assert {m.decode() for m in client.smembers(KEYS.dead)} == {*bad, "nan"}

    # A restarted consumer has nothing to reclaim but the two groups, and copies are duplicates.
    client.xadd(KEYS.groups, entry_fields(encode(bad["no-a"])))
    client.xadd(KEYS.groups, entry_fields(undecodable["nan"]))
    client.xadd(KEYS.groups, entry_fields(encode(group("fresh3", 5))))
    restarted = GroupConsumer(client, KEYS, block_ms=50, rules=RULES)
    again = restarted.pull(3, current_version=5, max_staleness=2, counts=counts)
    assert [g.group_id for g in again.groups] == ["fresh", "fresh2", "fresh3"]
    assert counts.duplicate == 2 and client.xlen(KEYS.deadletter) == 8


def test_every_producer_writes_one_dead_letter_shape(redis_url: str) -> None:
    """The trainer's records and the rollout's (tests/integration/test_rollout_rewards_client.py) are
    the same DeadLetter message in the field ``msg``; a record written by a trainer before the shape
    was unified (fields ``raw`` and ``reason``) still reads as one."""
    client = redis.Redis.from_url(redis_url)
    client.xadd(KEYS.deadletter, {b"raw": b"\x93old", b"reason": b"not a msgpack message"})
    consumer = GroupConsumer(client, KEYS, block_ms=50, rules=RULES)
    client.xadd(KEYS.groups, entry_fields(b"\xc1"))
    client.xadd(KEYS.groups, entry_fields(encode(group("ok", 0))))
    consumer.pull(1, current_version=0, max_staleness=2, counts=Counts())
    entries = client.xrange(KEYS.deadletter)
    assert [set(fields) for _, fields in entries[1:]] == [{b"msg"}]
    (_, legacy), (_, new) = read_dead_letters(client, KEYS)
    assert legacy.kind == new.kind == "undecodable"
    assert raw_bytes(legacy) == b"\x93old" and legacy.reason == "not a msgpack message"
    assert base64.b64decode(new.raw) == b"\xc1"


def test_a_step_the_trainer_keeps_dying_in_is_dead_lettered_at_max_crashes(redis_url: str) -> None:
    """The trainer dies while learning on g1, g2 (out of memory, an error, SIGKILL: no end_step, no
    commit) three times. Right: the first two restarts deliver them again; the third dead-letters both
    (kind crashed_trainer, whole, with the count in the reason), acknowledged, crash counts cleared, and
    training goes on with g3, g4. A stop after the update (end_step, no commit) counts nothing."""
    client = redis.Redis.from_url(redis_url)
    for name in ("g1", "g2", "g3", "g4"):
        client.xadd(KEYS.groups, entry_fields(encode(group(name, 0))))

    def start(counts: Counts) -> tuple[GroupConsumer, Pulled]:
        consumer = GroupConsumer(client, KEYS, block_ms=50, max_crashes=3)
        return consumer, consumer.pull(2, current_version=0, max_staleness=1, counts=counts)

    for crash in (1, 2, 3):
        counts = Counts()
        consumer, pulled = start(counts)
        assert [g.group_id for g in pulled.groups] == ["g1", "g2"] and counts.crashed_trainer == 0
        consumer.begin_step(pulled.groups)  # then the trainer dies mid-step
        assert client.smembers(KEYS.in_step) == {b"g1", b"g2"}
        if crash == 2:  # a trainer that starts and stops without a step adds nothing
            GroupConsumer(client, KEYS, block_ms=50, max_crashes=3)
            assert client.hgetall(KEYS.step_crashes) == {b"g1": b"2", b"g2": b"2"}

    counts = Counts()
    consumer, pulled = start(counts)
    assert [g.group_id for g in pulled.groups] == ["g3", "g4"] and counts.crashed_trainer == 2
    letters = {letter.group_id: letter for _, letter in read_dead_letters(client, KEYS)}
    assert set(letters) == {"g1", "g2"}
    assert all(
        x.kind == "crashed_trainer" and x.completions and x.source == "trainer" for x in letters.values()
    )
    assert "died 3 times" in letters["g1"].reason and "max_crashes_per_group: 3" in letters["g1"].reason
    assert client.smembers(KEYS.dead) == {b"g1", b"g2"}
    assert client.hgetall(KEYS.step_crashes) == {}  # settled groups keep no count
    assert not client.exists(KEYS.in_step)
    consumer.begin_step(pulled.groups)
    consumer.end_step()  # the update finished; the trainer stops before its commit

    counts = Counts()
    consumer, pulled = start(counts)
    assert [g.group_id for g in pulled.groups] == ["g3", "g4"]  # redelivered, no crash counted
    assert counts.crashed_trainer == 0 and client.hgetall(KEYS.step_crashes) == {}
    consumer.commit(pulled)
    assert client.smembers(KEYS.trained) == {b"g3", b"g4"} and pending(client) == 0


def test_a_crash_count_below_the_limit_is_dropped_once_the_group_is_trained(redis_url: str) -> None:
    """One death mid-step, then the groups train: their counts go, so a later crash starts from zero.
    With ``max_crashes=None`` no count ever dead-letters a group."""
    client = redis.Redis.from_url(redis_url)
    for name in ("g1", "g2"):
        client.xadd(KEYS.groups, entry_fields(encode(group(name, 0))))
    for _ in range(4):
        consumer = GroupConsumer(client, KEYS, block_ms=50, max_crashes=None)
        pulled = consumer.pull(2, current_version=0, max_staleness=1, counts=Counts())
        assert [g.group_id for g in pulled.groups] == ["g1", "g2"]
        consumer.begin_step(pulled.groups)
    consumer = GroupConsumer(client, KEYS, block_ms=50, max_crashes=5)
    assert client.hgetall(KEYS.step_crashes) == {b"g1": b"4", b"g2": b"4"}
    pulled = consumer.pull(2, current_version=0, max_staleness=1, counts=Counts())
    consumer.begin_step(pulled.groups)
    consumer.end_step()
    consumer.commit(pulled)
    assert client.smembers(KEYS.trained) == {b"g1", b"g2"}
    assert client.hgetall(KEYS.step_crashes) == {} and pending(client) == 0


def test_a_crash_count_goes_when_a_resume_finishes_the_commit(redis_url: str) -> None:
    """g1, g2 were in a step the trainer died in once; the next trainer trained them, saved the checkpoint
    and died before acknowledging (the resume adds them to ``trained`` from ``state.committing``). Right:
    their redelivered entries are skipped as copies and their crash counts dropped, not kept forever."""
    client = redis.Redis.from_url(redis_url)
    for name in ("g1", "g2", "g3"):
        client.xadd(KEYS.groups, entry_fields(encode(group(name, 0))))
    consumer = GroupConsumer(client, KEYS, block_ms=50, max_crashes=3)
    consumer.begin_step(consumer.pull(2, current_version=0, max_staleness=1, counts=Counts()).groups)
    consumer = GroupConsumer(client, KEYS, block_ms=50, max_crashes=3)  # counts the death
    pulled = consumer.pull(2, current_version=0, max_staleness=1, counts=Counts())
    consumer.begin_step(pulled.groups)
    consumer.end_step()  # trained, checkpoint saved, then the trainer died before its commit
    client.sadd(KEYS.trained, "g1", "g2")  # what the resume does from state.committing
    assert client.hgetall(KEYS.step_crashes) == {b"g1": b"1", b"g2": b"1"}

    counts = Counts()
    consumer = GroupConsumer(client, KEYS, block_ms=50, max_crashes=3)
    assert [g.group_id for g in consumer.pull(1, 0, 1, counts).groups] == ["g3"]
    assert counts.duplicate == 2 and client.hgetall(KEYS.step_crashes) == {}
