"""Redis Streams consumer of ScoredGroups with the accounting the design promises.

* Each group id ends in exactly one ledger set: ``trained`` (used by an optimizer step), ``stale``
  (older than ``max_staleness`` policy versions; dropped and acknowledged) or ``dead`` (dead-lettered:
  by the rollout when a reward failed, by the trainer when the group cannot be trained or its entry
  does not decode).
* Each group id is trained at most once. A copy of a group id already in a ledger set, or already
  pulled and not yet committed (in this pull, or an earlier step of the same checkpoint window), is
  acknowledged at once, skipped and counted as a duplicate: the first copy's entry stays pending until
  its commit, so the group is still delivered again if the trainer dies before its checkpoint. Copies
  appear when a producer's XADD pipeline is retried after a lost EXEC reply, or on replays.
* A group that decodes but cannot be trained (:class:`trainer.batching.GroupRules`) and an entry that
  does not decode are dead-lettered with the reason (:mod:`proto.deadletter`, one record shape for every
  producer) and acknowledged in one MULTI/EXEC, so training goes on instead of failing on them at every
  step and every restart.
* Entries are acknowledged only in :meth:`commit`, after the optimizer step that used them, together
  with the ledger update (one MULTI/EXEC), so a crash before that redelivers them.
* On start the trainer claims every pending entry of its consumer group (XAUTOCLAIM), whichever
  consumer name read it before, and serves those before new ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import redis

from proto import ScoredGroup, decode
from proto.deadletter import add_dead_letter, undecodable, untrainable
from proto.keys import RedisKeys
from proto.stream import MESSAGE_FIELD, QueueState, ensure_consumer_group, entry_message, queue_state
from trainer.batching import GroupRules

log = logging.getLogger("trainer.consumer")
SOURCE = "trainer"


@dataclass
class Pulled:
    """Groups ready to train on, with their stream entry ids (acknowledged at commit)."""

    groups: list[ScoredGroup] = field(default_factory=list)
    entry_ids: list[bytes] = field(default_factory=list)


@dataclass
class Counts:
    """Running totals of what :meth:`GroupConsumer.pull` did not train, and the ages it accepted."""

    stale: int = 0
    stale_producers: list[str] = field(default_factory=list)
    """Producer id of each stale group since the trainer last drained the list (per-replica metrics)."""
    duplicate: int = 0
    undecodable: int = 0
    untrainable: int = 0
    staleness: list[int] = field(default_factory=list)


class GroupConsumer:
    """``rules``: what a group must satisfy to be trained (None accepts every decoded group)."""

    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        consumer: str = "trainer-0",
        block_ms: int = 500,
        rules: GroupRules | None = None,
    ):
        self.client, self.keys, self.consumer, self.block_ms = client, keys, consumer, block_ms
        self.rules = rules
        self._in_flight: set[str] = set()  # pulled, not yet committed
        ensure_consumer_group(client, keys)
        self._claimed: list[tuple[bytes, dict]] = self._claim_pending()

    def _claim_pending(self) -> list[tuple[bytes, dict]]:
        """Entries delivered before a restart but never acknowledged, oldest first."""
        claimed, cursor = [], "0-0"
        while True:
            cursor, entries, _ = self.client.xautoclaim(
                self.keys.groups,
                self.keys.trainer_group,
                self.consumer,
                min_idle_time=0,
                start_id=cursor,
                count=512,
            )
            claimed.extend(e for e in entries if e[1])  # deleted entries come back without fields
            if cursor in (b"0-0", "0-0"):
                break
        if claimed:
            log.info("reclaimed %d pending group(s)", len(claimed))
        return claimed

    def _read(self, count: int) -> list[tuple[bytes, dict]]:
        if self._claimed:
            taken, self._claimed = self._claimed[:count], self._claimed[count:]
            return taken
        answer = self.client.xreadgroup(
            self.keys.trainer_group, self.consumer, {self.keys.groups: ">"}, count=count, block=self.block_ms
        )
        return [entry for _, entries in answer or [] for entry in entries]

    def pull(
        self, prompts: int, current_version: int, max_staleness: int, counts: Counts, stop=lambda: False
    ) -> Pulled:
        """Block until ``prompts`` fresh, trainable groups never trained before are in hand (or ``stop()``).

        Every other entry read on the way is acknowledged now and counted in ``counts``: duplicates,
        stale groups (``stale`` ledger), untrainable groups and undecodable entries (dead-lettered)."""
        pulled = Pulled()
        while len(pulled.groups) < prompts and not stop():
            for entry_id, fields in self._read(prompts - len(pulled.groups)):
                group = self._admit(entry_id, fields, current_version, max_staleness, counts)
                if group is not None:
                    self._in_flight.add(group.group_id)
                    counts.staleness.append(current_version - group.policy_version)
                    pulled.groups.append(group)
                    pulled.entry_ids.append(entry_id)
        return pulled

    def _admit(
        self, entry_id: bytes, fields: dict, current_version: int, max_staleness: int, counts: Counts
    ) -> ScoredGroup | None:
        """The entry's group when it is to be trained; otherwise acknowledge the entry (with its ledger
        or dead-letter record, atomically) and return None."""
        entry = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        message = entry_message(fields)
        try:
            if message is None:
                raise KeyError(MESSAGE_FIELD)
            group, letter = decode(message, ScoredGroup), None
        except Exception as exc:  # whatever fails to decode would fail again after every restart
            reason = (
                f"undecodable entry: {exc}"
                if message is not None
                else f"entry has no {MESSAGE_FIELD!r} field"
            )
            group, letter = None, undecodable(fields, reason[:2000], source=SOURCE, entry_id=entry)
        group_id = group.group_id if group is not None else letter.group_id
        if group_id is not None and self._seen(group_id):
            counts.duplicate += 1
            log.warning("skipped a second copy of group %s (entry %s)", group_id, entry)
            self.client.xack(self.keys.groups, self.keys.trainer_group, entry_id)
            return None
        if group is not None and self.rules is not None:
            reason = self.rules.violation(group)
            if reason is not None:
                letter = untrainable(group, reason, source=SOURCE, entry_id=entry)
        if letter is not None:
            if group is None:
                counts.undecodable += 1
            else:
                counts.untrainable += 1
            log.error("dead-lettered entry %s (group %s): %s", entry, group_id, letter.reason)
            pipe = self.client.pipeline(transaction=True)
            add_dead_letter(pipe, self.keys, letter)
            pipe.xack(self.keys.groups, self.keys.trainer_group, entry_id)
            pipe.execute()
            return None
        if current_version - group.policy_version > max_staleness:
            counts.stale += 1
            counts.stale_producers.append(group.producer_id)
            pipe = self.client.pipeline(transaction=True)
            pipe.sadd(self.keys.stale, group.group_id)
            pipe.xack(self.keys.groups, self.keys.trainer_group, entry_id)
            pipe.execute()
            return None
        return group

    def _seen(self, group_id: str) -> bool:
        """Pulled and not yet committed, or already in a ledger set (trained, stale or dead)."""
        if group_id in self._in_flight:
            return True
        pipe = self.client.pipeline(transaction=False)
        for ledger in (self.keys.trained, self.keys.stale, self.keys.dead):
            pipe.sismember(ledger, group_id)
        return any(pipe.execute())

    def commit(self, pulled: Pulled) -> None:
        """Record the groups as trained and acknowledge them, atomically."""
        if not pulled.groups:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.sadd(self.keys.trained, *[g.group_id for g in pulled.groups])
        pipe.xack(self.keys.groups, self.keys.trainer_group, *pulled.entry_ids)
        pipe.execute()
        self._in_flight.difference_update(g.group_id for g in pulled.groups)

    def queue_state(self) -> QueueState:
        """The queue as every side reports it (:func:`proto.stream.queue_state`)."""
        return queue_state(self.client, self.keys)
