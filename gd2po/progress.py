"""The live view of a running stack: trainer steps from the run log, the queue state from Redis and
generation speed from the rollout service's metrics, refreshed about once a second.

It only reads and renders: :class:`RunReader` takes a :class:`Snapshot` of a run from its run folder,
rollout URL and Redis, and :class:`RunView` shows snapshots. Supervising the services (who is alive,
when to stop) is the stack's job (:meth:`gd2po.stack.Stack.follow`); this module does not know the
stack.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gd2po.learning import quarter_rise
from gd2po.runlog import read_steps, reward_names
from proto.keys import RedisKeys
from proto.restarts import Restart, read_restarts
from proto.stream import QueueState, queue_state


@dataclass(frozen=True)
class Snapshot:
    """One moment of a run, as the live view shows it.

    ``steps``: the trainer's step records so far (metrics.jsonl, oldest first); ``rollout``: per rollout
    replica, its unlabelled metric samples by name (empty when it did not answer); ``queue``: the queue
    state (None when Redis did not answer); ``restarts``: the children ``gd2po up`` restarted after a
    crash (restarts.jsonl, oldest first)."""

    title: str
    total_steps: int
    steps: list[dict] = field(default_factory=list)
    rollout: list[dict[str, float]] = field(default_factory=list)
    queue: QueueState | None = None
    restarts: list[Restart] = field(default_factory=list)


class RunReader:
    """Reads :class:`Snapshot` s of one run; a context manager that owns its HTTP and Redis clients."""

    def __init__(
        self,
        *,
        title: str,
        total_steps: int,
        run_dir: Path,
        rollout_urls: list[str],
        redis_url: str,
        namespace: str,
    ):
        self.title, self.total_steps, self.run_dir = title, total_steps, Path(run_dir)
        self.rollout_urls, self.keys = list(rollout_urls), RedisKeys(namespace)
        self._http = httpx.Client(timeout=2.0)
        self._redis = redis.Redis.from_url(redis_url)

    def __enter__(self) -> RunReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()
        self._redis.close()

    def snapshot(self, *, live: bool = True) -> Snapshot:
        """The run now; without ``live`` only the step records (no scrape, no Redis round trips)."""
        steps, restarts = read_steps(self.run_dir), read_restarts(self.run_dir) or []
        if not live:
            return Snapshot(title=self.title, total_steps=self.total_steps, steps=steps, restarts=restarts)
        return Snapshot(
            title=self.title,
            total_steps=self.total_steps,
            steps=steps,
            rollout=[_scrape(self._http, url) for url in self.rollout_urls],
            queue=_queue(self._redis, self.keys),
            restarts=restarts,
        )


def _scrape(client: httpx.Client, url: str) -> dict[str, float]:
    try:
        text = client.get(f"{url}/metrics").text
    except httpx.HTTPError:
        return {}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                values[sample.name] = sample.value
    return values


def _queue(client: redis.Redis, keys: RedisKeys) -> QueueState | None:
    try:
        return queue_state(client, keys)
    except redis.RedisError:  # a view must not fail the run: show "?" until Redis answers again
        return None


def render(snapshot: Snapshot) -> Table:
    """The live table of a snapshot."""
    steps, rollout = snapshot.steps, snapshot.rollout
    last = steps[-1] if steps else {}
    table = Table(title=snapshot.title, expand=False)
    table.add_column("signal")
    table.add_column("value", justify="right")
    table.add_row("step", f"{int(last.get('step', 0))}/{snapshot.total_steps}")
    for name in reward_names(steps):
        table.add_row(f"reward {name} (mean)", _reward_cell(steps, name))
    for key in ("conflict_ratio", "drop_ratio", "keep_ratio", "informative_ratio", "loss"):
        if key in last:
            table.add_row(key, f"{last[key]:.4f}")
    speed = sum(replica.get("gd2po_rollout_tokens_per_second", 0.0) for replica in rollout)
    table.add_row("rollout tokens/s", f"{speed:.1f}")
    # One version per replica ("3 / 2"): each follows the policy on its own; "?" for one not answering.
    versions = [
        str(int(replica["gd2po_rollout_policy_version"]))
        if "gd2po_rollout_policy_version" in replica
        else "?"
        for replica in rollout
    ]
    table.add_row("rollout policy version", " / ".join(versions) or "?")
    # The names the services export and metrics.jsonl records (proto.stream.QUEUE_METRICS).
    queue = snapshot.queue.as_metrics() if snapshot.queue is not None else None
    for name in ("queue_lag", "queue_pending", "queue_dead_letters"):
        table.add_row(name, "?" if queue is None else str(queue[name]))
    if snapshot.restarts:
        table.add_row("restarts", _restarts_cell(snapshot.restarts))
    return table


def _restarts_cell(restarts: list[Restart]) -> str:
    """``3 (redis 1, trainer 2)``: restarts in all and per child, in the order they first happened."""
    counts: dict[str, int] = {}
    for restart in restarts:
        counts[restart.child] = counts.get(restart.child, 0) + 1
    return f"{len(restarts)} ({', '.join(f'{child} {n}' for child, n in counts.items())})"


def restart_line(restart: Restart) -> str:
    """One restart as the view prints it."""
    return (
        f"restart: {restart.child} exited with code {restart.exit_code}; restart "
        f"{restart.attempt}/{restart.max_restarts} in {restart.delay_s:.1f} s"
    )


def _reward_cell(steps: list[dict], name: str) -> str:
    """The newest step's mean, and once there are 8 steps the first vs the newest quarter's mean with the
    rise in pooled sd (gd2po.learning), so a rising reward is visible while the run goes on."""
    values = [s[f"reward_mean/{name}"] for s in steps if f"reward_mean/{name}" in s]
    if not values:
        return "nan"
    cell = f"{values[-1]:.3f}"
    if len(values) >= 8:
        rise = quarter_rise(values)
        cell += f"  (¼ {rise.first:.3f} → {rise.last:.3f}, {rise.in_sd:+.1f} sd)"
    return cell


class RunView:
    """Shows snapshots: a live table on a terminal, else one line per new trainer step; nothing when
    ``show`` is false. A context manager (the live table holds the terminal while it is open)."""

    def __init__(self, *, show: bool = True):
        self.show_anything = show
        self.interactive = show and sys.stdout.isatty()
        self._console = Console(stderr=False)
        self._live = Live(console=self._console, auto_refresh=False) if self.interactive else None
        self._printed = 0
        self._restarts_printed = 0

    def __enter__(self) -> RunView:
        if self._live is not None:
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def show(self, snapshot: Snapshot) -> None:
        # Each restart once, as a line (above the live table on a terminal, where its row counts them).
        for restart in snapshot.restarts[self._restarts_printed :]:
            self._console.print(restart_line(restart), style="yellow")
        self._restarts_printed = len(snapshot.restarts)
        if self._live is not None:
            self._live.update(render(snapshot))
            self._live.refresh()
        elif self.show_anything:
            for step in snapshot.steps[self._printed :]:
                self._console.print(_step_line(step))
            self._printed = len(snapshot.steps)


def _step_line(step: dict) -> str:
    parts = [f"step {int(step.get('step', 0))}"]
    parts += [f"{k}={step[k]:.4f}" for k in ("loss", "conflict_ratio", "keep_ratio") if k in step]
    parts += [f"{k}={v:.3f}" for k, v in step.items() if k.startswith("reward_mean/")]
    return "  ".join(parts)


_TQDM_STEP = re.compile(r"sft:[^\r\n]*?(\d+)/(\d+) \[")  # trainer.sft's bar, not model loading's


def _training_steps(log_path: Path) -> tuple[int, int] | None:
    """(done, total) of the newest ``sft:`` progress bar in the cold start's log, if any."""
    try:
        with log_path.open("rb") as log:
            log.seek(0, 2)
            log.seek(max(0, log.tell() - 4096))
            tail = log.read().decode(errors="replace")
    except FileNotFoundError:
        return None
    found = _TQDM_STEP.findall(tail)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


@contextlib.contextmanager
def cold_start_progress(log_path: Path, *, show: bool = True) -> Iterator[Callable[[], None]]:
    """A progress bar of the SFT cold start's optimizer steps, read from its log; yields ``tick`` to
    call while waiting. Prints one line per tenth of the steps when stdout is not a terminal."""
    console = Console()
    interactive = show and sys.stdout.isatty()
    bar = Progress(
        TextColumn("cold start (SFT)"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    task = bar.add_task("sft", total=None)
    printed = [-1]

    def tick() -> None:
        steps = _training_steps(log_path)
        if steps is None or not show:
            return
        done, total = steps
        if interactive:
            bar.update(task, completed=done, total=total)
        elif total and done * 10 // total > printed[0]:
            printed[0] = done * 10 // total
            console.print(f"cold start (SFT): step {done}/{total}")

    if interactive:
        with bar:
            yield tick
    else:
        if show:
            console.print(f"cold start (SFT): training or loading from cache, log {log_path}")
        yield tick
