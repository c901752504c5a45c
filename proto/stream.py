"""The groups-stream contract between the rollout (producer) and the trainer (consumer), one definition
for both sides and for whoever watches the queue (metrics, ``gd2po up``'s live view):

- every stream entry (groups and dead letters) holds its encoded message in one field,
  :data:`MESSAGE_FIELD`; write it with :func:`entry_fields`, read it with :func:`entry_message`;
- the trainer's consumer group is created from the start of the stream by whichever side comes first
  (:func:`ensure_consumer_group`);
- the queue is described by one :class:`QueueState` (:func:`queue_state`), so every side reports the
  same three numbers under the same names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import redis

from proto.keys import RedisKeys

MESSAGE_FIELD = "msg"
"""The field of a stream entry (groups, dead letters) that holds the encoded message."""

# redis-py returns field names as bytes (no decode_responses) and accepts str when writing: readers
# look the field up by these bytes, writers use the str.
_MESSAGE_FIELD_BYTES = MESSAGE_FIELD.encode()

_RANGE_PAGE = 1000  # entries per XRANGE call when lag has to be counted (see queue_state)


def entry_fields(message: bytes) -> dict[str, bytes]:
    """The fields of a stream entry carrying ``message`` (an encoded proto message), for XADD."""
    return {MESSAGE_FIELD: message}


def entry_message(fields: Mapping[bytes | str, bytes]) -> bytes | None:
    """The encoded message of a stream entry as read back (bytes or str field names), None if absent."""
    if _MESSAGE_FIELD_BYTES in fields:
        return fields[_MESSAGE_FIELD_BYTES]
    return fields.get(MESSAGE_FIELD)


def ensure_consumer_group(client: redis.Redis, keys: RedisKeys) -> None:
    """Create the trainer's consumer group on the groups stream, from its first entry (``id=0``), and
    the stream itself if missing. Idempotent: an existing group is kept as it is (its position and
    pending entries intact). Either side may call it first, so no group written before the trainer
    starts is skipped.

    Raises ``redis.ResponseError`` for anything but "group exists" (e.g. the key is not a stream).
    """
    try:
        client.xgroup_create(keys.groups, keys.trainer_group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


@dataclass(frozen=True)
class QueueState:
    """The groups queue as the trainer's consumer group sees it, and the dead-letter stream.

    - ``lag``: groups in the stream not yet delivered to the trainer (what the rollout's backpressure
      bounds by ``rollout.max_backlog``).
    - ``pending``: groups delivered to the trainer and not yet acknowledged: being trained on, or trained
      and waiting for the next checkpoint (the trainer acknowledges at checkpoints).
    - ``dead_letters``: entries in the dead-letter stream (never trimmed: every one ever written).
    """

    lag: int
    pending: int
    dead_letters: int

    def as_metrics(self) -> dict[str, int]:
        """The three numbers under their metric names (the keys of :data:`QUEUE_METRICS`)."""
        return {"queue_lag": self.lag, "queue_pending": self.pending, "queue_dead_letters": self.dead_letters}


QUEUE_METRICS = {
    "queue_lag": "Groups in the stream not yet delivered to the trainer",
    "queue_pending": "Groups delivered to the trainer and not yet acknowledged (acknowledged at checkpoints)",
    "queue_dead_letters": "Entries in the dead-letter stream",
}
"""Name → help text of the :class:`QueueState` metrics. Every side uses these names: the services export
gauges ``gd2po_<service>_<name>`` (trainer and rollout), the trainer's ``metrics.jsonl`` records the
same keys, and ``gd2po up``'s live view shows the same rows."""


def queue_state(client: redis.Redis, keys: RedisKeys) -> QueueState:
    """Read the :class:`QueueState` of ``keys``' groups stream (two or three round trips).

    Lag is the consumer group's ``lag`` from XINFO GROUPS when Redis knows it. Redis answers nil when
    it cannot derive it from its counters — an entry after the group's last delivered one was deleted
    (XDEL, XTRIM) — and then the entries after the last delivered id are counted with XRANGE, so the
    number is exact either way (that count costs O(lag), and happens only after deletions).
    Before the trainer's group exists every entry of the stream is lag (the group will be created
    from the start), and a missing stream has lag and pending 0.

    Raises ``redis.RedisError`` when Redis cannot be reached.
    """
    dead_letters = int(client.xlen(keys.deadletter))
    try:
        groups = client.xinfo_groups(keys.groups)
    except redis.ResponseError as exc:  # "no such key": nothing produced and no consumer group yet
        if "no such key" not in str(exc).lower():
            raise
        return QueueState(lag=0, pending=0, dead_letters=dead_letters)
    for group in groups:
        if _text(group["name"]) == keys.trainer_group:
            lag = group.get("lag")
            if lag is None:
                lag = _count_after(client, keys.groups, _text(group["last-delivered-id"]))
            return QueueState(lag=int(lag), pending=int(group["pending"]), dead_letters=dead_letters)
    return QueueState(lag=int(client.xlen(keys.groups)), pending=0, dead_letters=dead_letters)


def _count_after(client: redis.Redis, stream: str, last_id: str) -> int:
    """Entries of ``stream`` with an id greater than ``last_id``, counted page by page."""
    count, start = 0, f"({last_id}"
    while page := client.xrange(stream, min=start, count=_RANGE_PAGE):
        count += len(page)
        start = f"({_text(page[-1][0])}"
    return count


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class GroupsWanted:
    """A synchronous trainer's request for another batch (:func:`want_more_groups`)."""

    policy_version: int
    produced: int
    """The ``produced`` counter when the trainer asked: the request stands only while it is unchanged."""
    groups: int
    """Groups wanted: the step's missing informative groups, within its read bound."""


def want_more_groups(
    client: redis.Redis, keys: RedisKeys, policy_version: int, produced: int, groups: int
) -> None:
    """The trainer asks for a batch of ``groups`` more groups: it is at ``policy_version``, has read
    every group the stream held and still lacks some (a synchronous run, where the rollout otherwise
    waits for a new version while the trainer waits for groups: ``trainer.dynamic_sampling`` skipped
    groups without signal, groups were dead-lettered, or a publish failed and no new version came). The
    trainer reads every group of such a batch within the step, so none is left to go stale.

    ``produced`` is the ``produced`` counter read *before* the trainer's read that came back empty (see
    :func:`produced_count`): groups are published with their count in one transaction, so every group
    it counts had been delivered or dead-lettered by then. The rollout serves the request only while the
    counter still has that value: anything produced since (the batch of a new version, a served batch, groups
    dead-lettered on the way) is unread or dead and makes the request stale, and the trainer, still
    short, asks again with the new count. So a request is served at most once, never while groups the
    trainer has not read are waiting, and a batch that yielded nothing usable never leaves both sides
    waiting."""
    client.set(keys.groups_wanted, f"{policy_version}:{produced}:{groups}")


def produced_count(client: redis.Redis, keys: RedisKeys) -> int:
    """Groups produced so far by every rollout (published or dead-lettered): the ``produced`` counter."""
    return int(client.get(keys.produced) or 0)


def groups_wanted(client: redis.Redis, keys: RedisKeys) -> GroupsWanted | None:
    """The trainer's latest request, or None (none yet, or not one :func:`want_more_groups` wrote)."""
    raw = client.get(keys.groups_wanted)
    if raw is None:
        return None
    try:  # UnicodeDecodeError is a ValueError: a value no trainer wrote is no request, never a crash
        request = _text(raw)
        version, produced, groups = (int(part) for part in request.split(":"))
    except ValueError:
        return None
    return GroupsWanted(version, produced, groups) if groups > 0 else None
