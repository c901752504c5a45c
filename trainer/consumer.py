"""Redis Streams consumer of ScoredGroups with the accounting the design promises.

* Each group id ends in exactly one ledger set: ``trained`` (used by an optimizer step), ``stale``
  (older than ``max_staleness`` policy versions; dropped and acknowledged), ``skipped`` (read under
  ``trainer.dynamic_sampling`` and acknowledged without training: no signal) or ``dead`` (dead-lettered:
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
* No crash loop on a group that kills the trainer: a step's group ids are in the ``in_step`` set from
  the step's read to the end of its update (:meth:`begin_step` … :meth:`end_step`). A trainer that
  starts and finds the set left behind counts one crash for each of those groups (``step_crashes``) and,
  at ``max_crashes``, dead-letters them (kind ``crashed_trainer``) instead of training them again. Any
  death in that window counts (a SIGKILL after a stop's grace period, a lost node too): the limit
  tolerates ``max_crashes - 1`` of them per group.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import redis

from proto import ScoredGroup, decode
from proto.deadletter import add_dead_letter, crashed_trainer, undecodable, untrainable
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
    skipped: list[ScoredGroup] = field(default_factory=list)
    """Read for this step and acknowledged as skipped: no signal (dynamic sampling)."""
    informative: int = 0
    """How many of ``groups`` carry a signal (all of them without dynamic sampling)."""


@dataclass(frozen=True)
class StepSampling:
    """How one step reads groups under dynamic sampling (built by trainer.sampling.step_sampling)."""

    informative: Callable[[ScoredGroup], bool]
    read_limit: int
    """Most groups (fresh, trainable, first copies) read for one step: ceil(oversample · prompts_per_step)."""


class Starved(Protocol):
    """Told when a read comes back empty while the step still lacks groups (the ``starved`` argument of
    :meth:`GroupConsumer.pull`; a synchronous run asks the rollout for more: trainer.sampling.MoreGroups)."""

    def before_read(self) -> None:
        """Called before every read that may find the stream dry (to snapshot what was produced)."""

    def __call__(self, groups_read: int, groups_wanted: int) -> None:
        """The read came back empty: ``groups_read`` read this step, ``groups_wanted`` more (informative,
        under dynamic sampling) groups missing within the read bound."""


@dataclass
class Counts:
    """Running totals of what :meth:`GroupConsumer.pull` did not train, and the ages it accepted."""

    stale: int = 0
    skipped: int = 0
    stale_producers: list[str] = field(default_factory=list)
    """Producer id of each stale group since the trainer last drained the list (per-replica metrics)."""
    duplicate: int = 0
    undecodable: int = 0
    untrainable: int = 0
    crashed_trainer: int = 0
    staleness: list[int] = field(default_factory=list)


class GroupConsumer:
    """``rules``: what a group must satisfy to be trained (None accepts every decoded group).
    ``max_crashes``: trainer deaths mid-step a group survives before it is dead-lettered
    (``trainer.max_crashes_per_group``; None: never)."""

    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        consumer: str = "trainer-0",
        block_ms: int = 500,
        rules: GroupRules | None = None,
        max_crashes: int | None = None,
    ):
        self.client, self.keys, self.consumer, self.block_ms = client, keys, consumer, block_ms
        self.rules, self.max_crashes = rules, max_crashes
        self._in_flight: set[str] = set()  # pulled, not yet committed
        ensure_consumer_group(client, keys)
        self._crashes: dict[str, int] = self._count_crash()
        self._claimed: list[tuple[bytes, dict]] = self._claim_pending()

    def _count_crash(self) -> dict[str, int]:
        """If the last trainer died mid-step (``in_step`` left set), count one crash for each group of
        that step, clearing the set in the same MULTI/EXEC (a death during this counts nothing twice).
        Returns every group's crash count."""
        held = self.client.smembers(self.keys.in_step)
        if held:
            pipe = self.client.pipeline(transaction=True)
            for group_id in held:
                pipe.hincrby(self.keys.step_crashes, group_id, 1)
            pipe.delete(self.keys.in_step)
            pipe.execute()
            log.warning(
                "the last trainer died while learning on a step of %d group(s): one crash counted for each",
                len(held),
            )
        return {
            key.decode(): int(value) for key, value in self.client.hgetall(self.keys.step_crashes).items()
        }

    def begin_step(self, groups: list[ScoredGroup]) -> None:
        """Name the groups the trainer is about to learn on (``in_step``), before the update."""
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.in_step)
        pipe.sadd(self.keys.in_step, *(g.group_id for g in groups))
        pipe.execute()

    def end_step(self) -> None:
        """The update of the groups named by :meth:`begin_step` is done: the trainer did not die in it."""
        self.client.delete(self.keys.in_step)

    def _forget_crashes(self, pipe: redis.client.Pipeline, group_ids: list[str]) -> None:
        """Queue dropping the crash counts of groups that are now settled (trained, stale, skipped, dead)."""
        counted = [group_id for group_id in group_ids if self._crashes.pop(group_id, None) is not None]
        if counted:
            pipe.hdel(self.keys.step_crashes, *counted)

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

    def _read(self, count: int, *, block: bool = True) -> list[tuple[bytes, dict]]:
        """Up to ``count`` entries: reclaimed ones first, then new ones, waiting up to ``block_ms`` for
        the first (``block``) or not at all."""
        if self._claimed:
            taken, self._claimed = self._claimed[:count], self._claimed[count:]
            return taken
        answer = self.client.xreadgroup(
            self.keys.trainer_group,
            self.consumer,
            {self.keys.groups: ">"},
            count=count,
            block=self.block_ms if block else None,
        )
        return [entry for _, entries in answer or [] for entry in entries]

    def pull(
        self,
        prompts: int,
        current_version: int,
        max_staleness: int,
        counts: Counts,
        stop=lambda: False,
        sampling: StepSampling | None = None,
        starved: Starved | None = None,
    ) -> Pulled:
        """Block until ``prompts`` fresh, trainable groups never trained before are in hand (or ``stop()``).

        Every other entry read on the way is acknowledged now and counted in ``counts``: duplicates,
        stale groups (``stale`` ledger), untrainable groups and undecodable entries (dead-lettered).

        With ``sampling`` (``trainer.dynamic_sampling``) only informative groups count toward ``prompts``:
        the others are held while reading goes on, up to ``sampling.read_limit`` groups. Once the step is
        full they are acknowledged as skipped (``skipped`` ledger); when the limit comes first they fill
        the step, oldest first, and ``Pulled.informative`` says how many groups carry a signal. A stop
        leaves them pending (delivered again to the next trainer).

        ``starved`` is told each time a read finds the stream dry mid-step (after looking without blocking
        once groups were read), with what the step still lacks."""
        pulled, held = Pulled(), Pulled()
        limit = sampling.read_limit if sampling is not None else prompts
        read, dry = 0, False
        while len(pulled.groups) < prompts and read < limit and not stop():
            wanted = min(prompts - len(pulled.groups), limit - read)
            # Whoever waits on `starved` learns at once that the stream ran dry mid-step: look without
            # blocking first, then block (and repeat the no-op call) until groups come.
            if starved is not None:
                starved.before_read()
            entries = self._read(wanted, block=starved is None or read == 0 or dry)
            dry = not entries
            if dry and starved is not None:
                starved(read, wanted)
            for entry_id, fields in entries:
                group = self._admit(entry_id, fields, current_version, max_staleness, counts)
                if group is None:
                    continue
                read += 1
                self._in_flight.add(group.group_id)
                target = pulled if sampling is None or sampling.informative(group) else held
                target.groups.append(group)
                target.entry_ids.append(entry_id)
        pulled.informative = len(pulled.groups)
        if len(pulled.groups) < prompts and read < limit:  # stopping: nothing skipped, all stays pending
            self._in_flight.difference_update(g.group_id for g in held.groups)
            return pulled
        fill = prompts - len(pulled.groups)
        if fill:
            log.warning(
                "read %d groups (trainer.dynamic_sampling bound); %d of %d carry a signal, %d without "
                "signal fill the step",
                read,
                len(pulled.groups),
                prompts,
                fill,
            )
        pulled.groups += held.groups[:fill]
        pulled.entry_ids += held.entry_ids[:fill]
        for group in pulled.groups:
            counts.staleness.append(current_version - group.policy_version)
        self._skip(held.groups[fill:], held.entry_ids[fill:], counts)
        pulled.skipped = held.groups[fill:]
        return pulled

    def _skip(self, groups: list[ScoredGroup], entry_ids: list[bytes], counts: Counts) -> None:
        """Record groups without signal as skipped and acknowledge them, atomically: a skipped group is
        never trained, so it needs no checkpoint before its acknowledgement (as a stale one)."""
        if not groups:
            return
        self._settle(self.keys.skipped, [g.group_id for g in groups], entry_ids)
        counts.skipped += len(groups)
        self._in_flight.difference_update(g.group_id for g in groups)

    def _settle(self, ledger: str, group_ids: list[str], entry_ids: list[bytes]) -> None:
        """Add the groups to one ledger set and acknowledge their entries in one MULTI/EXEC, so a crash
        leaves them either pending (redelivered) or settled (skipped as seen), never both or neither."""
        pipe = self.client.pipeline(transaction=True)
        pipe.sadd(ledger, *group_ids)
        pipe.xack(self.keys.groups, self.keys.trainer_group, *entry_ids)
        self._forget_crashes(pipe, group_ids)
        pipe.execute()

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
            pipe = self.client.pipeline(transaction=True)
            pipe.xack(self.keys.groups, self.keys.trainer_group, entry_id)
            if group_id not in self._in_flight:  # settled (e.g. a commit finished on resume): no count left
                self._forget_crashes(pipe, [group_id])
            pipe.execute()
            return None
        if group is not None and self.rules is not None:
            reason = self.rules.violation(group)
            if reason is not None:
                letter = untrainable(group, reason, source=SOURCE, entry_id=entry)
        crashes = self._crashes.get(group_id, 0) if group is not None else 0
        if letter is None and self.max_crashes is not None and crashes >= self.max_crashes:
            reason = (
                f"the trainer died {crashes} times while learning on a step that held this group "
                f"(trainer.max_crashes_per_group: {self.max_crashes}); every group of that step was "
                "counted, as which one caused it is not known"
            )
            letter = crashed_trainer(group, reason, source=SOURCE, entry_id=entry)
        if letter is not None:
            # Counts has a field for each kind the trainer writes (undecodable, untrainable, crashed_trainer).
            setattr(counts, letter.kind, getattr(counts, letter.kind) + 1)
            log.error("dead-lettered entry %s (group %s): %s", entry, group_id, letter.reason)
            pipe = self.client.pipeline(transaction=True)
            add_dead_letter(pipe, self.keys, letter)
            pipe.xack(self.keys.groups, self.keys.trainer_group, entry_id)
            if group_id is not None:
                self._forget_crashes(pipe, [group_id])
            pipe.execute()
            return None
        if current_version - group.policy_version > max_staleness:
            counts.stale += 1
            counts.stale_producers.append(group.producer_id)
            self._settle(self.keys.stale, [group.group_id], [entry_id])
            return None
        return group

    def _seen(self, group_id: str) -> bool:
        """Pulled and not yet committed, or already in a ledger set (trained, stale, skipped or dead)."""
        if group_id in self._in_flight:
            return True
        pipe = self.client.pipeline(transaction=False)
        for ledger in (self.keys.trained, self.keys.stale, self.keys.skipped, self.keys.dead):
            pipe.sismember(ledger, group_id)
        return any(pipe.execute())

    def commit(self, pulled: Pulled) -> None:
        """Record the groups as trained and acknowledge them, atomically."""
        if not pulled.groups:
            return
        self._settle(self.keys.trained, [g.group_id for g in pulled.groups], pulled.entry_ids)
        self._in_flight.difference_update(g.group_id for g in pulled.groups)

    def queue_state(self) -> QueueState:
        """The queue as every side reports it (:func:`proto.stream.queue_state`)."""
        return queue_state(self.client, self.keys)
