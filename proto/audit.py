"""Audit logs kept outside Redis (``run.audit``): what each rollout handed to Redis and what each reward
service answered, so a run can be reconciled against the Redis ledger after the fact — after a Redis
crash too, which is the point (``python -m bench.chaos``, tests/chaos).

* **Producers' log** ``<run>/audit/produced-<producer_id>.jsonl``: one :class:`ProducedGroup` per group a
  rollout published or dead-lettered, appended (and fsync'd) only after Redis acknowledged the write. A
  rollout killed between the acknowledgement and the append leaves a group Redis has and this log lacks
  (at most one batch per kill); never the reverse.
* **Score logs** ``<run>/audit/scores-<reward>-<pid>.jsonl``: one :class:`AuditedScore` per item a reward
  service scored, keyed by :func:`score_digest` of what decides the score (completion and label), so a
  score stored in a group can be traced to an answer of the reward service it claims to come from.

Every line is written with one ``write`` on a file opened for appending, so concurrent writers never
interleave inside a line; a line cut short by a kill is skipped by :func:`read_jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

AUDIT_DIR = "audit"


def score_digest(completion: str, label: str | None) -> str:
    """A key for one scored item: SHA-256 (hex, 32 chars) of the completion and the label, the inputs of
    a rule-based score. The prompt is left out: a group stores its prompt as token ids, not text."""
    blob = json.dumps([completion, label], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


@dataclass(frozen=True)
class ProducedGroup:
    """One group a rollout handed to Redis."""

    group_id: str
    outcome: Literal["published", "dead_lettered"]
    policy_version: int
    """The policy version the group was generated with."""
    producer_id: str
    time: float
    """When Redis acknowledged it (Unix seconds)."""


@dataclass(frozen=True)
class AuditedScore:
    """One item a reward service scored, as it answered."""

    reward: str
    digest: str
    """:func:`score_digest` of the item."""
    score: float | None
    """None when the item failed (``status: error``)."""
    time: float


class AuditLog:
    """Append-only JSONL file, each record on one line written by one ``write`` and fsync'd (a record is on
    disk before the writer moves on)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def append(self, records: list[ProducedGroup] | list[AuditedScore]) -> None:
        if not records:
            return
        os.write(self._fd, "".join(json.dumps(asdict(r)) + "\n" for r in records).encode())
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def produced_log_path(run_dir: Path, producer_id: str) -> Path:
    return Path(run_dir) / AUDIT_DIR / f"produced-{producer_id}.jsonl"


def score_log_path(audit_dir: Path, reward: str) -> Path:
    return Path(audit_dir) / f"scores-{reward}-{os.getpid()}.jsonl"


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Every complete record of one audit log (a line cut short by a crash is skipped)."""
    with open(path) as lines:
        for line in lines:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def read_produced(run_dir: Path) -> list[ProducedGroup]:
    """Every producer's records, each log in its own order, logs by file name."""
    folder = Path(run_dir) / AUDIT_DIR
    return [
        ProducedGroup(**record)
        for path in sorted(folder.glob("produced-*.jsonl"))
        for record in read_jsonl(path)
    ]


def read_scores(run_dir: Path) -> dict[tuple[str, str], set[float | None]]:
    """(reward, digest) → every score the reward's services answered for it."""
    answered: dict[tuple[str, str], set[float | None]] = {}
    for path in sorted((Path(run_dir) / AUDIT_DIR).glob("scores-*.jsonl")):
        for record in read_jsonl(path):
            answered.setdefault((record["reward"], record["digest"]), set()).add(record["score"])
    return answered
