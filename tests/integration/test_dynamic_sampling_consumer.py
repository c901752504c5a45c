"""The trainer's consumer under ``trainer.dynamic_sampling``, against a real Redis: informative groups
fill the step, groups without signal are acknowledged once as skipped (a ledger set of their own, never
trained, never delivered again), the read bound fills the step with held groups and says so, a stop
skips nothing, and every produced group ends in exactly one ledger set."""

from __future__ import annotations

import pytest
import redis
from trainer_data import tiny_group

from proto import encode
from proto.keys import RedisKeys
from proto.stream import entry_fields
from trainer.consumer import Counts, GroupConsumer, StepSampling

pytestmark = pytest.mark.integration
KEYS = RedisKeys()
SIGNAL = {"a": [0.0, 1.0]}
FLAT = {"a": [1.0, 1.0]}


def informative(group) -> bool:
    """The rule's stand-in here: the rule itself is tested in tests/unit/test_informative_groups.py."""
    return len(set(group.rewards["a"])) > 1


def push(client: redis.Redis, *groups) -> None:
    for g in groups:
        client.xadd(KEYS.groups, entry_fields(encode(g)))
    client.incrby(KEYS.produced, len(groups))


def ledger(client: redis.Redis) -> dict[str, set[str]]:
    return {
        name: {m.decode() for m in client.smembers(getattr(KEYS, name))}
        for name in ("trained", "stale", "skipped", "dead")
    }


def pending(client: redis.Redis) -> int:
    return client.xpending(KEYS.groups, KEYS.trainer_group)["pending"]


def test_groups_without_signal_are_skipped_once_and_informative_ones_fill_the_step(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    consumer = GroupConsumer(client, KEYS, block_ms=50)
    push(
        client,
        tiny_group("flat-1", 3, FLAT),
        tiny_group("sig-1", 3, SIGNAL),
        tiny_group("flat-2", 3, FLAT),
        tiny_group("sig-2", 3, SIGNAL),
        tiny_group("sig-3", 3, SIGNAL),
    )
    counts = Counts()
    sampling = StepSampling(informative=informative, read_limit=4)
    pulled = consumer.pull(2, 3, 2, counts, sampling=sampling)
    assert [g.group_id for g in pulled.groups] == ["sig-1", "sig-2"]
    assert [g.group_id for g in pulled.skipped] == ["flat-1", "flat-2"]
    assert pulled.informative == 2 and counts.skipped == 2
    # Skipped groups are acknowledged at once; the trained ones stay pending until the commit.
    assert ledger(client)["skipped"] == {"flat-1", "flat-2"} and pending(client) == 2
    # A second copy of a skipped group (a retried XADD) is a duplicate, not trained.
    push(client, tiny_group("flat-1", 3, SIGNAL), tiny_group("sig-4", 3, SIGNAL))
    consumer.commit(pulled)
    again = consumer.pull(2, 3, 2, counts, sampling=sampling)
    assert [g.group_id for g in again.groups] == ["sig-3", "sig-4"] and counts.duplicate == 1
    consumer.commit(again)
    sets = ledger(client)
    assert sets["trained"] == {"sig-1", "sig-2", "sig-3", "sig-4"} and sets["skipped"] == {"flat-1", "flat-2"}
    assert pending(client) == 0
    # Exactly once: the six distinct groups each in one set, none in two.
    members = [g for s in sets.values() for g in s]
    assert len(members) == len(set(members)) == 6


def test_the_read_bound_fills_the_step_with_groups_without_signal(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    consumer = GroupConsumer(client, KEYS, block_ms=50)
    push(client, *(tiny_group(f"flat-{i}", 0, FLAT) for i in range(3)), tiny_group("sig", 0, SIGNAL))
    counts = Counts()
    pulled = consumer.pull(2, 0, 2, counts, sampling=StepSampling(informative=informative, read_limit=3))
    # Three read (the bound), none informative: the two oldest fill the step, the third is skipped.
    assert [g.group_id for g in pulled.groups] == ["flat-0", "flat-1"]
    assert pulled.informative == 0 and [g.group_id for g in pulled.skipped] == ["flat-2"]
    consumer.commit(pulled)
    assert ledger(client)["trained"] == {"flat-0", "flat-1"} and ledger(client)["skipped"] == {"flat-2"}
    nxt = consumer.pull(1, 0, 2, counts, sampling=StepSampling(informative=informative, read_limit=3))
    assert [g.group_id for g in nxt.groups] == ["sig"]  # the unread group was never touched


class StarvedRecorder:
    """The consumer's ``starved`` callback, recording: "look" before each read, (read, wanted) when dry."""

    def __init__(self) -> None:
        self.reads: list = []

    def before_read(self) -> None:
        self.reads.append("look")

    def __call__(self, groups_read: int, groups_wanted: int) -> None:
        self.reads.append((groups_read, groups_wanted))


def test_a_stop_mid_step_skips_nothing_and_the_next_trainer_reads_it_all_again(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    consumer = GroupConsumer(client, KEYS, block_ms=50)
    push(client, tiny_group("flat", 0, FLAT), tiny_group("sig", 0, SIGNAL))
    recorder = StarvedRecorder()
    reads = recorder.reads
    sampling = StepSampling(informative=informative, read_limit=8)
    stop_after_empty_read = lambda: (2, 2) in reads  # noqa: E731 - the stream ran dry: the trainer stops
    pulled = consumer.pull(3, 0, 2, Counts(), stop_after_empty_read, sampling, recorder)
    # Looked before each read; told when the stream ran dry: 2 read, 2 more informative wanted.
    assert reads == ["look", "look", (2, 2)]
    assert [g.group_id for g in pulled.groups] == ["sig"] and not pulled.skipped
    assert not ledger(client)["skipped"] and pending(client) == 2  # both delivered again after a restart
    restarted = GroupConsumer(client, KEYS, block_ms=50)
    taken = restarted.pull(2, 0, 2, Counts())
    assert [g.group_id for g in taken.groups] == ["flat", "sig"]


def test_without_sampling_a_stream_dry_mid_step_is_told_too(redis_url: str) -> None:
    """A synchronous trainer without dynamic sampling may be short too (groups dead-lettered, a failed
    publish): it is told what the step lacks, as with sampling."""
    client = redis.Redis.from_url(redis_url)
    consumer = GroupConsumer(client, KEYS, block_ms=50)
    push(client, tiny_group("sig", 0, SIGNAL))
    recorder = StarvedRecorder()
    reads = recorder.reads
    pulled = consumer.pull(3, 0, 2, Counts(), lambda: (1, 2) in reads, None, recorder)
    assert reads == ["look", "look", (1, 2)]  # 1 read, 2 more wanted
    assert [g.group_id for g in pulled.groups] == ["sig"]


def test_without_sampling_a_group_without_signal_trains_as_before(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    consumer = GroupConsumer(client, KEYS, block_ms=50)
    push(client, tiny_group("flat", 0, FLAT), tiny_group("sig", 0, SIGNAL))
    pulled = consumer.pull(2, 0, 2, Counts())
    assert [g.group_id for g in pulled.groups] == ["flat", "sig"] and pulled.informative == 2
    assert not pulled.skipped


def test_after_a_crash_before_the_commit_only_the_trained_groups_come_back(redis_url: str) -> None:
    """The trainer dies after a step that skipped groups, before its checkpoint: the restarted trainer
    is delivered the step's trained groups again (their update was lost) and never the skipped ones
    (acknowledged with their ledger entry when they were skipped)."""
    client = redis.Redis.from_url(redis_url)
    first = GroupConsumer(client, KEYS, consumer="trainer-old", block_ms=50)
    push(client, tiny_group("flat", 0, FLAT), tiny_group("sig-1", 0, SIGNAL), tiny_group("sig-2", 0, SIGNAL))
    sampling = StepSampling(informative=informative, read_limit=4)
    taken = first.pull(2, 0, 2, Counts(), sampling=sampling)
    assert [g.group_id for g in taken.groups] == ["sig-1", "sig-2"]  # then the process dies

    restarted = GroupConsumer(client, KEYS, block_ms=50)
    again = restarted.pull(2, 0, 2, Counts(), sampling=sampling)
    assert [g.group_id for g in again.groups] == ["sig-1", "sig-2"] and not again.skipped
    restarted.commit(again)
    assert ledger(client) == {
        "trained": {"sig-1", "sig-2"},
        "stale": set(),
        "skipped": {"flat"},
        "dead": set(),
    }
    assert pending(client) == 0


def test_a_request_for_more_groups_stands_only_until_something_is_produced(redis_url: str) -> None:
    """The synchronous request protocol (proto.stream.want_more_groups), as the rollout reads it: a request
    is one (version, produced, groups); anything produced after it — the new version's own batch, the
    served batch, or groups dead-lettered on the way — leaves it stale, so a batch that yielded nothing
    usable is followed by a new request instead of both sides waiting."""
    from proto.stream import groups_wanted, want_more_groups
    from rollout_service.producer import Producer

    client = redis.Redis.from_url(redis_url)
    producer = Producer(client, KEYS)
    assert groups_wanted(client, KEYS) is None
    want_more_groups(client, KEYS, policy_version=3, produced=producer.produced(), groups=2)
    first = producer.groups_wanted()
    assert (first.policy_version, first.produced, first.groups) == (3, 0, 2)
    assert first.produced == producer.produced()  # stands: the rollout would serve it
    # The served batch was dead-lettered whole (a reward failed): produced moved, the request is stale...
    client.incrby(KEYS.produced, 2)
    assert producer.groups_wanted().produced != producer.produced()
    # ...and the trainer, still short, asks again: a new request that stands.
    want_more_groups(client, KEYS, policy_version=3, produced=producer.produced(), groups=2)
    again = producer.groups_wanted()
    assert again != first and again.produced == producer.produced() == 2
    for garbage in ("garbage", b"\xff\xfe:1:2"):  # not one the trainer wrote: no request, no crash
        client.set(KEYS.groups_wanted, garbage)
        assert groups_wanted(client, KEYS) is None
