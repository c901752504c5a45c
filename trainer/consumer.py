"""Redis Streams consumer of ScoredGroups with the accounting the design promises.

* Each group id ends in exactly one ledger set: ``trained`` (used by an optimizer step), ``stale``
  (older than ``max_staleness`` policy versions; dropped and acknowledged) — the rollout service puts
  dead-lettered ones in ``dead``. A group id already in ``trained`` is acknowledged and skipped
  (idempotent after restarts and duplicate deliveries).
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
from proto.codec import CodecError
from proto.keys import RedisKeys

log = logging.getLogger("trainer.consumer")
FIELD = b"msg"


@dataclass
class Pulled:
    """Groups ready to train on, with their stream entry ids (acknowledged at commit)."""

    groups: list[ScoredGroup] = field(default_factory=list)
    entry_ids: list[bytes] = field(default_factory=list)


@dataclass
class Counts:
    stale: int = 0
    duplicate: int = 0
    undecodable: int = 0
    staleness: list[int] = field(default_factory=list)


class GroupConsumer:
    def __init__(
        self, client: redis.Redis, keys: RedisKeys, consumer: str = "trainer-0", block_ms: int = 500
    ):
        self.client, self.keys, self.consumer, self.block_ms = client, keys, consumer, block_ms
        try:
            client.xgroup_create(keys.groups, keys.trainer_group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
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
        """Block until ``prompts`` fresh, not-yet-trained groups are in hand (or ``stop()``)."""
        pulled = Pulled()
        while len(pulled.groups) < prompts and not stop():
            for entry_id, fields in self._read(prompts - len(pulled.groups)):
                group = self._decode(entry_id, fields, counts)
                if group is None:
                    continue
                if self.client.sismember(self.keys.trained, group.group_id):
                    counts.duplicate += 1
                    self.client.xack(self.keys.groups, self.keys.trainer_group, entry_id)
                    continue
                age = current_version - group.policy_version
                if age > max_staleness:
                    counts.stale += 1
                    pipe = self.client.pipeline(transaction=True)
                    pipe.sadd(self.keys.stale, group.group_id)
                    pipe.xack(self.keys.groups, self.keys.trainer_group, entry_id)
                    pipe.execute()
                    continue
                counts.staleness.append(age)
                pulled.groups.append(group)
                pulled.entry_ids.append(entry_id)
        return pulled

    def _decode(self, entry_id: bytes, fields: dict, counts: Counts) -> ScoredGroup | None:
        try:
            return decode(fields[FIELD], ScoredGroup)
        except (KeyError, CodecError, ValueError) as exc:
            # Keep the bytes for inspection instead of dropping them silently.
            counts.undecodable += 1
            log.error("undecodable entry %s moved to the dead-letter stream: %s", entry_id, exc)
            pipe = self.client.pipeline(transaction=True)
            pipe.xadd(self.keys.deadletter, {b"raw": fields.get(FIELD, b""), b"reason": str(exc)[:500]})
            pipe.xack(self.keys.groups, self.keys.trainer_group, entry_id)
            pipe.execute()
            return None

    def commit(self, pulled: Pulled) -> None:
        """Record the groups as trained and acknowledge them, atomically."""
        pipe = self.client.pipeline(transaction=True)
        pipe.sadd(self.keys.trained, *[g.group_id for g in pulled.groups])
        pipe.xack(self.keys.groups, self.keys.trainer_group, *pulled.entry_ids)
        pipe.execute()

    def queue_depth(self) -> int:
        """Groups produced but not yet read by the trainer."""
        for group in self.client.xinfo_groups(self.keys.groups):
            name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
            if name == self.keys.trainer_group:
                return int(group.get("lag") or 0)
        return 0

    def deadletter_depth(self) -> int:
        return int(self.client.xlen(self.keys.deadletter))
