"""The run folder's restart log, ``restarts.jsonl``: one line per child that ``gd2po up`` restarted after
a crash. ``gd2po up`` creates it (empty) and is its only writer; the trainer counts it into every step
record of ``metrics.jsonl`` (:func:`restart_metrics`) and the live view shows it. A run whose services
are started by something else (compose, Kubernetes) has no such file and no restart keys in its records:
there the orchestrator counts restarts.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESTARTS_FILE = "restarts.jsonl"


@dataclass(frozen=True)
class Restart:
    """One restart of a crashed child."""

    child: str
    """The child's name in services.json (``trainer``, ``rollout``, ``reward-<name>-<i>``) or ``redis``."""
    exit_code: int
    """How it ended: a negative code is the signal that killed it (-9: SIGKILL)."""
    attempt: int
    """This child's restarts so far in the run, this one included."""
    max_restarts: int
    """The child's restart budget."""
    delay_s: float
    """Seconds waited before starting it again (the backoff)."""
    time: float = field(default_factory=time.time)
    """When the crash was seen (Unix seconds)."""


def start_log(run_dir: Path) -> None:
    """Create the empty restart log of a supervised run (kept as it is on ``--resume``)."""
    (Path(run_dir) / RESTARTS_FILE).touch()


def append_restart(run_dir: Path, restart: Restart) -> None:
    """Append one restart, one line in one write (readers never see half a record but the last)."""
    with (Path(run_dir) / RESTARTS_FILE).open("a") as log:
        log.write(json.dumps(asdict(restart)) + "\n")


def read_restarts(run_dir: Path) -> list[Restart] | None:
    """Every restart so far, oldest first; None when the run is not supervised by ``gd2po up`` (no
    file). A half-written last line is skipped."""
    path = Path(run_dir) / RESTARTS_FILE
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    restarts = []
    for line in lines:
        try:
            restarts.append(Restart(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue
    return restarts


def restart_metrics(run_dir: Path) -> dict[str, int]:
    """The restart counts a step record carries: ``restarts_total`` and ``restarts/<child>`` for every
    child restarted so far; {} for a run without a restart log."""
    restarts = read_restarts(run_dir)
    if restarts is None:
        return {}
    counts: dict[str, int] = {"restarts_total": len(restarts)}
    for restart in restarts:
        counts[f"restarts/{restart.child}"] = counts.get(f"restarts/{restart.child}", 0) + 1
    return counts
