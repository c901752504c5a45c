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
from proto.startup import StartupError
from proto.stream import (
    MESSAGE_FIELD,
    GroupsWanted,
    QueueState,
    ensure_consumer_group,
    groups_wanted,
    produced_count,
    queue_state,
)


class PromptOrderMismatch(StartupError):
    """A rollout's prompt order is not the one the experiment's other rollouts use."""


# Adds each message to a stream once and counts it once in ``produced``, atomically. The rollout's Redis
# client re-sends a call whose connection dropped (proto/redis_conn.py); when Redis had already run it and
# only the reply was lost, a plain MULTI/EXEC would add the groups twice and over-count ``produced`` — which
# a synchronous trainer compares to decide whether its request for more groups was served. The id set
# makes the second run a no-op. KEYS: stream, id set, produced counter; ARGV: field, then id, message pairs.
_ADD_ONCE = """
local field = ARGV[1]
local added = 0
for i = 2, #ARGV, 2 do
  if redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    redis.call('XADD', KEYS[1], '*', field, ARGV[i + 1])
    added = added + 1
  end
end
if added > 0 then
  redis.call('INCRBY', KEYS[3], added)
end
return added
"""


class Producer:
    """``audit``: the producers' log (``run.audit``); each group is appended once Redis acknowledged it.

    Groups and dead letters are added once per group id (the ``published`` and ``dead`` sets), so a call
    the Redis client re-sends after a lost reply neither duplicates them nor over-counts ``produced``."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, audit: AuditLog | None = None):
        self.client, self.keys, self.audit = client, keys, audit
        self._add_once = client.register_script(_ADD_ONCE)
        ensure_consumer_group(client, keys)

    def publish(self, groups: list[ScoredGroup]) -> None:
        self._add(self.keys.groups, self.keys.published, [(g.group_id, encode(g)) for g in groups])
        self._audit(groups, "published")

    def dead_letter(self, letters: list[DeadLetter]) -> None:
        keyed = [(letter.group_id, encode(letter)) for letter in letters if letter.group_id is not None]
        self._add(self.keys.deadletter, self.keys.dead, keyed)
        anonymous = [letter for letter in letters if letter.group_id is None]
        if anonymous:  # nothing to recognise a repeat by: added as they come
            pipe = self.client.pipeline(transaction=True)
            for letter in anonymous:
                add_dead_letter(pipe, self.keys, letter)
            pipe.incrby(self.keys.produced, len(anonymous))
            pipe.execute()
        self._audit(letters, "dead_lettered")

    def _add(self, stream: str, ids: str, messages: list[tuple[str, bytes]]) -> None:
        if messages:
            args: list[str | bytes] = [MESSAGE_FIELD]
            for group_id, message in messages:
                args += [group_id, message]
            self._add_once(keys=[stream, ids, self.keys.produced], args=args)

    def _audit(self, groups: list[ScoredGroup] | list[DeadLetter], outcome: str) -> None:
        if self.audit is not None:
            now = time.time()
            self.audit.append(
                [ProducedGroup(g.group_id, outcome, g.policy_version, g.producer_id, now) for g in groups]
            )

    def agree_on_prompt_order(self, fingerprint: str) -> None:
        """Record ``fingerprint`` as the experiment's prompt order, or check it against the one recorded
        by the first rollout. Raises :class:`PromptOrderMismatch` when they differ: positions claimed
        from the shared cursor would then name other prompts on each replica."""
        self.client.set(self.keys.prompt_order, fingerprint, nx=True)
        recorded = self.client.get(self.keys.prompt_order)
        recorded = recorded.decode() if isinstance(recorded, bytes) else recorded
        if recorded != fingerprint:
            raise PromptOrderMismatch(
                f"this rollout's prompt order ({fingerprint[:19]}…) differs from the one recorded in Redis "
                f"key {self.keys.prompt_order} ({str(recorded)[:19]}…): every rollout replica of an "
                "experiment needs the same data.train_files, data.shuffle_seed, data.overlong_prompts and "
                "model tokenizer. For a new dataset use a new redis.namespace (or an empty Redis)"
            )

    def claim_prompts(self, count: int) -> int:
        """Claim the next ``count`` positions of the shared prompt order; returns the first. Atomic
        (INCRBY), so replicas never claim the same position."""
        return int(self.client.incrby(self.keys.prompt_cursor, count)) - count

    def queue_state(self) -> QueueState:
        """The queue as every side reports it; its ``lag`` is the backlog that backpressure bounds."""
        return queue_state(self.client, self.keys)

    def produced(self) -> int:
        """Groups produced so far by every rollout (published or dead-lettered)."""
        return produced_count(self.client, self.keys)

    def groups_wanted(self) -> GroupsWanted | None:
        """The synchronous trainer's latest request for another batch (proto.stream.want_more_groups)."""
        return groups_wanted(self.client, self.keys)
