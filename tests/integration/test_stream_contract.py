"""The groups-stream contract of proto.stream against a real Redis: the message field both sides use,
consumer-group creation, and one queue state (lag, pending, dead letters) that the rollout, the trainer
and the live view of ``gd2po up`` all report — including when Redis cannot tell the lag (nil)."""

from __future__ import annotations

import time

import pytest
import redis
from trainer_data import tiny_group

from gd2po.ports import free_port
from gd2po.progress import RunReader
from proto import DeadLetter, ScoredGroup, decode, encode
from proto import stream as stream_contract
from proto.deadletter import read_dead_letters
from proto.keys import RedisKeys
from proto.stream import QueueState, ensure_consumer_group, entry_fields, entry_message, queue_state
from rollout_service.producer import Producer
from trainer.consumer import Counts, GroupConsumer

pytestmark = pytest.mark.integration
KEYS = RedisKeys("contract")


def letter(group_id: str) -> DeadLetter:
    return DeadLetter(
        kind="reward_failed",
        reason="r",
        source="rollout",
        dead_at=time.time(),
        group_id=group_id,
        failed_rewards=["a"],
    )


def test_what_the_producer_writes_the_consumer_reads(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    producer = Producer(client, KEYS)
    producer.publish([tiny_group("g0"), tiny_group("g1")])
    producer.dead_letter([letter("g2")])
    # Raw entries carry exactly the one message field, read back (bytes field names) by entry_message.
    entries = client.xrange(KEYS.groups)
    assert [set(fields) for _, fields in entries] == [{stream_contract.MESSAGE_FIELD.encode()}] * 2
    assert [decode(entry_message(fields), ScoredGroup).group_id for _, fields in entries] == ["g0", "g1"]
    assert [entry.group_id for _, entry in read_dead_letters(client, KEYS)] == ["g2"]
    pulled = GroupConsumer(client, KEYS, block_ms=50).pull(2, 0, 0, Counts())
    assert [g.group_id for g in pulled.groups] == ["g0", "g1"]


def test_entry_message_reads_str_and_bytes_field_names() -> None:
    assert entry_message({b"msg": b"x"}) == b"x"
    assert entry_message(entry_fields(b"y")) == b"y"
    assert entry_message({b"other": b"z"}) is None


def test_consumer_group_creation_is_idempotent_and_keeps_the_position(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.xadd(KEYS.groups, entry_fields(encode(tiny_group("before"))))  # written before any group exists
    ensure_consumer_group(client, KEYS)
    client.xreadgroup(KEYS.trainer_group, "c", {KEYS.groups: ">"}, count=1)
    ensure_consumer_group(client, KEYS)  # the other side comes second: nothing is reset
    Producer(client, KEYS)
    assert queue_state(client, KEYS) == QueueState(lag=0, pending=1, dead_letters=0)
    wrong = RedisKeys("wrong")
    client.set(wrong.groups, "not a stream")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):  # only "group exists" is swallowed
        ensure_consumer_group(client, wrong)


def test_queue_state_lag_pending_and_dead_letters(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert queue_state(client, KEYS) == QueueState(lag=0, pending=0, dead_letters=0)  # nothing yet
    for index in range(5):
        client.xadd(KEYS.groups, entry_fields(encode(tiny_group(f"g{index}"))))
    # No consumer group yet: it will be created from the stream's start, so every entry is lag.
    assert queue_state(client, KEYS) == QueueState(lag=5, pending=0, dead_letters=0)
    producer = Producer(client, KEYS)
    consumer = GroupConsumer(client, KEYS, block_ms=50)
    pulled = consumer.pull(2, 0, 0, Counts())
    producer.dead_letter([letter("d0")])
    expected = QueueState(lag=3, pending=2, dead_letters=1)
    assert producer.queue_state() == consumer.queue_state() == expected
    consumer.commit(pulled)
    assert queue_state(client, KEYS) == QueueState(lag=3, pending=0, dead_letters=1)


def test_lag_is_counted_when_redis_reports_nil(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = redis.Redis.from_url(redis_url)
    producer = Producer(client, KEYS)
    producer.publish([tiny_group(f"g{index}") for index in range(9)])
    consumer = GroupConsumer(client, KEYS, block_ms=50)
    consumer.pull(2, 0, 0, Counts())
    undelivered = [entry_id for entry_id, _ in client.xrange(KEYS.groups)][2:]
    client.xdel(KEYS.groups, undelivered[3])  # a deletion after the last delivered entry
    (info,) = client.xinfo_groups(KEYS.groups)
    assert info["lag"] is None  # the case handled: Redis cannot tell
    monkeypatch.setattr(stream_contract, "_RANGE_PAGE", 2)  # several pages, so paging is exercised
    assert queue_state(client, KEYS) == QueueState(lag=6, pending=2, dead_letters=0)
    assert consumer.queue_state().lag == producer.queue_state().lag == 6


def test_the_live_view_reads_the_same_queue_state(redis_url: str, tmp_path) -> None:
    client = redis.Redis.from_url(redis_url)
    producer = Producer(client, KEYS)
    producer.publish([tiny_group("g0"), tiny_group("g1"), tiny_group("g2")])
    GroupConsumer(client, KEYS, block_ms=50).pull(1, 0, 0, Counts())
    producer.dead_letter([letter("d0")])
    with RunReader(
        title="t",
        total_steps=4,
        run_dir=tmp_path,
        rollout_urls=[f"http://127.0.0.1:{free_port()}"],  # nothing listens: no rollout metrics
        redis_url=redis_url,
        namespace=KEYS.namespace,
    ) as reader:
        snapshot = reader.snapshot()
    assert snapshot.queue == producer.queue_state() == QueueState(lag=2, pending=1, dead_letters=1)
    assert snapshot.rollout == [{}] and snapshot.steps == []


def test_the_live_view_shows_unknown_when_redis_is_gone(tmp_path) -> None:
    with RunReader(
        title="t",
        total_steps=4,
        run_dir=tmp_path,
        rollout_urls=[f"http://127.0.0.1:{free_port()}"],
        redis_url=f"redis://127.0.0.1:{free_port()}",
        namespace="x",
    ) as reader:
        assert reader.snapshot().queue is None
