"""Redis side of the rollout: push ScoredGroups, dead-letter failed ones, measure the backlog.

The backlog is what the trainer has not read yet: entries not delivered to its consumer group (the
group's ``lag``). Delivered-but-unacknowledged entries (``pending``; the trainer acknowledges at its
checkpoints) are already being trained on and do not hold generation back. The stream is never
trimmed, so nothing unconsumed is lost.
"""

from __future__ import annotations

import redis

from proto import DeadLetter, ScoredGroup, encode
from proto.deadletter import add_dead_letter
from proto.keys import MESSAGE_FIELD, RedisKeys

FIELD = MESSAGE_FIELD


def ensure_consumer_group(client: redis.Redis, keys: RedisKeys) -> None:
    """Create the trainer's consumer group from the stream's start (idempotent)."""
    try:
        client.xgroup_create(keys.groups, keys.trainer_group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def queue_state(client: redis.Redis, keys: RedisKeys) -> tuple[int, int]:
    """(undelivered, pending) entries of the trainer's consumer group."""
    for group in client.xinfo_groups(keys.groups):
        name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
        if name == keys.trainer_group:
            lag = group.get("lag")
            if lag is None:  # Redis cannot tell after deletions: count what follows the last delivery
                lag = len(
                    client.xrange(keys.groups, min=f"({group['last-delivered-id'].decode()}", count=10_000)
                )
            return int(lag), int(group["pending"])
    return int(client.xlen(keys.groups)), 0


class Producer:
    def __init__(self, client: redis.Redis, keys: RedisKeys):
        self.client, self.keys = client, keys
        ensure_consumer_group(client, keys)

    def publish(self, groups: list[ScoredGroup]) -> None:
        pipe = self.client.pipeline(transaction=True)
        for group in groups:
            pipe.xadd(self.keys.groups, {FIELD: encode(group)})
        pipe.incrby(self.keys.produced, len(groups))
        pipe.execute()

    def dead_letter(self, letters: list[DeadLetter]) -> None:
        pipe = self.client.pipeline(transaction=True)
        for letter in letters:
            add_dead_letter(pipe, self.keys, letter)
        pipe.incrby(self.keys.produced, len(letters))
        pipe.execute()

    def backlog(self) -> int:
        """Groups the trainer has not read yet."""
        return queue_state(self.client, self.keys)[0]
