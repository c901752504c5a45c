"""The exactly-once ledger of a finished run, reconciled from three witnesses that fail independently: the
producers' log (``run.audit``, outside Redis), Redis restarted on its append-only file (streams and the
trained / stale / skipped / dead sets), and the trainer's ``metrics.jsonl``. Used by ``python -m bench.chaos`` and
tests/chaos.

Every group a rollout logged as published must end in exactly one of: trained once, dead-lettered (with
a reason), dropped as stale, skipped without signal (``trainer.dynamic_sampling``), or still in the queue when the run stopped (the backlog the trainer did not
need); anything else is *lost*. Every score stored in a group must be one its reward service answered
(the score logs), or it is *fabricated*.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis

from gd2po.runlog import read_steps
from proto import DeadLetter, ScoredGroup, decode
from proto.audit import read_produced, read_scores, score_digest
from proto.keys import RedisKeys
from proto.stream import entry_message


@dataclass
class Ledger:
    """What happened to every group of one run. ``problems`` lists each broken promise in words."""

    produced: int = 0
    """Groups the producers' log says Redis acknowledged (published + dead-lettered by the rollout)."""
    published: int = 0
    trained: int = 0
    dead: Counter[str] = field(default_factory=Counter)
    """Dead-lettered groups by kind (``reward_failed`` from the rollout, ``untrainable`` from the trainer)."""
    stale: int = 0
    skipped: int = 0
    """Groups read under ``trainer.dynamic_sampling`` and acknowledged without training: no gradient."""
    left_in_queue: int = 0
    """Published groups the trainer never read: the backlog at the end of the run."""
    lost: list[str] = field(default_factory=list)
    trained_twice: list[str] = field(default_factory=list)
    two_outcomes: list[str] = field(default_factory=list)
    """Groups in more than one of trained / stale / skipped / dead."""
    unlogged: int = 0
    """Groups Redis has that no producer logged: written just before a rollout was killed. Classified
    like logged ones; ``produced + unlogged`` is every group of the run."""
    duplicate_entries: int = 0
    """Second stream entries of one group (a producer's retried write); the trainer skips them."""
    scores_checked: int = 0
    fabricated: list[str] = field(default_factory=list)
    pending: int = 0
    """Stream entries read by the trainer and not acknowledged when the run ended (must be 0)."""
    steps_reached: int = 0
    total_steps: int = 0
    rollout_version_regressions: list[str] = field(default_factory=list)
    trainer_version_regressions: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _trained_lineage(run_dir: Path) -> list[dict]:
    """The step records of the surviving lineage: for each step number the last record written. A step
    logged, then lost to a trainer crash before its checkpoint, is trained again and logged again; only
    the second one's update is in the model."""
    last: dict[int, dict] = {}
    for record in read_steps(run_dir):
        last[int(record["step"])] = record
    return [last[step] for step in sorted(last)]


def _entries(client: redis.Redis, stream: str) -> list[tuple[bytes, dict]]:
    return client.xrange(stream, "-", "+")


def reconcile(
    run_dir: Path, client: redis.Redis, keys: RedisKeys, total_steps: int, max_unlogged: int | None = None
) -> Ledger:
    """Account for every group of the run in ``run_dir`` against the Redis behind ``client`` (the run's
    own server, restarted on its append-only file after the run). ``max_unlogged``: how many groups may
    be in Redis without a producer's log line (the rollout kills × prompts per batch; None: no bound)."""
    ledger = Ledger(total_steps=total_steps)
    produced = read_produced(run_dir)
    ledger.produced = len(produced)
    logged = {p.group_id: p for p in produced}

    groups: dict[str, ScoredGroup] = {}
    for _, fields in _entries(client, keys.groups):
        group = decode(entry_message(fields), ScoredGroup)
        if group.group_id in groups:
            ledger.duplicate_entries += 1
        groups[group.group_id] = group
    letters: dict[str, DeadLetter] = {}
    for _, fields in _entries(client, keys.deadletter):
        letter = decode(entry_message(fields), DeadLetter)
        if letter.group_id is not None:
            letters[letter.group_id] = letter
    trained_set = {g.decode() for g in client.smembers(keys.trained)}
    stale_set = {g.decode() for g in client.smembers(keys.stale)}
    skipped_set = {g.decode() for g in client.smembers(keys.skipped)}
    dead_set = {g.decode() for g in client.smembers(keys.dead)}
    read = _read_by_trainer(client, keys)

    lineage = _trained_lineage(run_dir)
    ledger.steps_reached = int(lineage[-1]["step"]) if lineage else 0
    trained_ids = Counter(g for record in lineage for g in record["group_ids"])
    ledger.trained_twice = sorted(g for g, n in trained_ids.items() if n > 1)
    ledger.trained = len(trained_ids)

    # Every group either witness knows of: logged by a producer, or in Redis (a rollout killed between
    # Redis' reply and its log append leaves a group only Redis knows; `max_unlogged` bounds those).
    rollout_letters = {g for g, letter in letters.items() if letter.source == "rollout"}
    unlogged = (set(groups) | rollout_letters) - set(logged)
    ledger.unlogged = len(unlogged)
    for group_id in [*logged, *sorted(unlogged)]:
        outcomes = [
            name
            for name, members in (
                ("trained", trained_set),
                ("stale", stale_set),
                ("skipped", skipped_set),
                ("dead", dead_set),
            )
            if group_id in members
        ]
        if len(outcomes) > 1:
            ledger.two_outcomes.append(group_id)
        record = logged.get(group_id)
        if record is None or record.outcome == "published":
            ledger.published += record is not None
            if group_id not in groups and group_id not in rollout_letters:
                ledger.lost.append(group_id)  # acknowledged by Redis, gone after its restart
            elif group_id in rollout_letters:
                if group_id not in dead_set:  # dead-lettered by the rollout, unlogged
                    ledger.lost.append(group_id)
            elif not outcomes:
                if group_id in read:
                    ledger.lost.append(group_id)  # read by the trainer and never settled
                else:
                    ledger.left_in_queue += 1
        elif group_id not in dead_set or group_id not in letters:
            ledger.lost.append(group_id)
    if max_unlogged is not None and ledger.unlogged > max_unlogged:
        ledger.problems.append(
            f"{ledger.unlogged} group(s) in Redis that no producer logged, more than the {max_unlogged} "
            "a rollout kill can leave: is the producers' log written?"
        )
    ledger.pending = _pending(client, keys)
    for group_id in dead_set:
        letter = letters.get(group_id)
        ledger.dead[letter.kind if letter else "no record"] += 1
    ledger.stale = len(stale_set)
    ledger.skipped = len(skipped_set)
    if set(trained_ids) != trained_set:
        ledger.problems.append(
            f"metrics.jsonl and the trained set disagree: {len(set(trained_ids) - trained_set)} trained but not "
            f"recorded, {len(trained_set - set(trained_ids))} recorded but not in a surviving step"
        )

    answered = read_scores(run_dir)
    for group_id, holder in [*groups.items(), *letters.items()]:
        label = (holder.metadata or {}).get("label")
        for reward, scores in (holder.rewards or {}).items():
            if len(scores) != len(holder.completions or []):
                ledger.fabricated.append(f"{group_id}/{reward}: {len(scores)} scores")
                continue
            for completion, score in zip(holder.completions or [], scores, strict=True):
                ledger.scores_checked += 1
                if score not in answered.get((reward, score_digest(completion.text, label)), set()):
                    ledger.fabricated.append(f"{group_id}/{reward}={score}")

    last_version: dict[str, int] = {}  # per producer: rollouts on other machines may lag each other
    for record in sorted(produced, key=lambda p: p.time):
        last = last_version.get(record.producer_id, -1)
        if record.policy_version < last:
            ledger.rollout_version_regressions.append(
                f"{record.group_id}: v{record.policy_version} after v{last}"
            )
        last_version[record.producer_id] = max(last, record.policy_version)
    for before, after in itertools.pairwise(lineage):
        if after["policy_version"] < before["policy_version"]:
            ledger.trainer_version_regressions.append(
                f"step {after['step']}: v{after['policy_version']} after v{before['policy_version']}"
            )
    _judge(ledger)
    return ledger


def _pending(client: redis.Redis, keys: RedisKeys) -> int:
    """Entries the trainer read and never acknowledged: none may remain once a run ended at total_steps."""
    try:
        return int(client.xpending(keys.groups, keys.trainer_group)["pending"])
    except redis.ResponseError:  # no consumer group: nothing was read
        return 0


def _read_by_trainer(client: redis.Redis, keys: RedisKeys) -> set[str]:
    """Group ids of entries the trainer's consumer group has read (delivered), acknowledged or not."""
    info = {
        (g["name"].decode() if isinstance(g["name"], bytes) else g["name"]): g
        for g in client.xinfo_groups(keys.groups)
    }
    last = info.get(keys.trainer_group, {}).get("last-delivered-id", b"0-0")
    if not last or last in (b"0-0", "0-0"):
        return set()
    ids = set()
    for _, fields in client.xrange(keys.groups, "-", last):
        ids.add(decode(entry_message(fields), ScoredGroup).group_id)
    return ids


def _judge(ledger: Ledger) -> None:
    problems = ledger.problems
    if ledger.produced == 0:
        problems.append("no producer logged a group: was run.audit on?")
    for found, what in (
        (ledger.lost, "group(s) lost"),
        (ledger.trained_twice, "group(s) trained twice"),
        (ledger.two_outcomes, "group(s) with two outcomes"),
        (ledger.fabricated, "stored score(s) no reward service answered"),
        (ledger.rollout_version_regressions, "time(s) the rollout's policy version went backwards"),
        (ledger.trainer_version_regressions, "time(s) the trainer's policy version went backwards"),
    ):
        if found:
            problems.append(f"{len(found)} {what}, e.g. {found[:3]}")
    if ledger.scores_checked == 0:
        problems.append("no stored score to check: were the reward services' score logs on?")
    if ledger.steps_reached != ledger.total_steps:
        problems.append(f"the trainer reached step {ledger.steps_reached} of {ledger.total_steps}")
    if ledger.pending:
        problems.append(f"{ledger.pending} stream entries read and never acknowledged at the end")
    if ledger.dead.get("no record"):
        problems.append(f"{ledger.dead['no record']} dead group(s) without a dead letter")


def summary(ledger: Ledger) -> dict[str, object]:
    """The ledger's figures as one flat dict (for a table row or JSON)."""
    return {
        "produced": ledger.produced,
        "trained": ledger.trained,
        "dead_lettered": sum(ledger.dead.values()),
        "dead_by_kind": dict(ledger.dead),
        "stale": ledger.stale,
        "skipped": ledger.skipped,
        "left_in_queue": ledger.left_in_queue,
        "lost": len(ledger.lost),
        "trained_twice": len(ledger.trained_twice),
        "two_outcomes": len(ledger.two_outcomes),
        "unlogged": ledger.unlogged,
        "pending": ledger.pending,
        "duplicate_entries": ledger.duplicate_entries,
        "scores_checked": ledger.scores_checked,
        "fabricated": len(ledger.fabricated),
        "steps": f"{ledger.steps_reached}/{ledger.total_steps}",
        "problems": ledger.problems,
    }
