"""Redis side of the rollout: push ScoredGroups, dead-letter failed ones, read the queue state.

The backlog is what the trainer has not read yet: the ``lag`` of :class:`proto.stream.QueueState`.
Delivered-but-unacknowledged entries (``pending``; the trainer acknowledges at its checkpoints) are
already being trained on and do not hold generation back. The stream is never trimmed, so nothing
unconsumed is lost.
"""

from __future__ import annotations

import time

import redis

from proto import DeadLetter, ScoredGroup, encode
from proto.audit import AuditLog, ProducedGroup
from proto.deadletter import add_dead_letter
from proto.keys import RedisKeys
from proto.stream import QueueState, ensure_consumer_group, entry_fields, queue_state


class Producer:
    """``audit``: the producers' log (``run.audit``); each group is appended once Redis acknowledged it."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, audit: AuditLog | None = None):
        self.client, self.keys, self.audit = client, keys, audit
        ensure_consumer_group(client, keys)

    def publish(self, groups: list[ScoredGroup]) -> None:
        pipe = self.client.pipeline(transaction=True)
        for group in groups:
            pipe.xadd(self.keys.groups, entry_fields(encode(group)))
        pipe.incrby(self.keys.produced, len(groups))
        pipe.execute()
        self._audit(groups, "published")

    def dead_letter(self, letters: list[DeadLetter]) -> None:
        pipe = self.client.pipeline(transaction=True)
        for letter in letters:
            add_dead_letter(pipe, self.keys, letter)
        pipe.incrby(self.keys.produced, len(letters))
        pipe.execute()
        self._audit(letters, "dead_lettered")

    def _audit(self, groups: list[ScoredGroup] | list[DeadLetter], outcome: str) -> None:
        if self.audit is not None:
            now = time.time()
            self.audit.append(
                [ProducedGroup(g.group_id, outcome, g.policy_version, g.producer_id, now) for g in groups]
            )

    def queue_state(self) -> QueueState:
        """The queue as every side reports it; its ``lag`` is the backlog that backpressure bounds."""
        return queue_state(self.client, self.keys)
