"""The live view of a running stack: trainer steps from the run log, queue depth from Redis and
generation speed from the rollout service's metrics, refreshed about once a second."""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from gd2po.stack import Stack


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


def _queue_depth(client: redis.Redis, keys: RedisKeys) -> int | None:
    try:
        for group in client.xinfo_groups(keys.groups):
            if group["name"] in (keys.trainer_group, keys.trainer_group.encode()):
                return int(group.get("lag") or 0) + int(group.get("pending") or 0)
        return int(client.xlen(keys.groups))
    except redis.RedisError:
        return None


def _table(stack: Stack, steps: list[dict], rollout: dict[str, float], depth: int | None) -> Table:
    total = stack.config.trainer.total_steps
    last = steps[-1] if steps else {}
    table = Table(title=f"gd2po · {stack.config.run.name} · {stack.run_dir}", expand=False)
    table.add_column("signal")
    table.add_column("value", justify="right")
    table.add_row("step", f"{int(last.get('step', 0))}/{total}")
    for name in reward_names(steps):
        table.add_row(f"reward {name} (mean)", _reward_cell(steps, name))
    for key in ("conflict_ratio", "drop_ratio", "keep_ratio", "loss"):
        if key in last:
            table.add_row(key, f"{last[key]:.4f}")
    table.add_row("rollout tokens/s", f"{rollout.get('gd2po_rollout_tokens_per_second', 0.0):.1f}")
    table.add_row("rollout policy version", f"{int(rollout.get('gd2po_rollout_policy_version', 0))}")
    table.add_row("queue depth", "?" if depth is None else str(depth))
    return table


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


def follow_run(stack: Stack, *, show: bool = True, poll_s: float = 1.0) -> None:
    """Block until the trainer exits (or a child fails), showing progress."""
    console = Console(stderr=False)
    interactive = show and sys.stdout.isatty()
    keys = RedisKeys(stack.config.redis.namespace)
    redis_client = redis.Redis.from_url(stack.redis_url)
    printed = 0
    with (
        httpx.Client(timeout=2.0) as http,
        Live(console=console, auto_refresh=False) if interactive else _Null() as live,
    ):
        while stack.trainer.exit_code() is None:
            stack.check_alive()
            steps = read_steps(stack.run_dir)
            if interactive:
                live.update(
                    _table(stack, steps, _scrape(http, stack.rollout_url), _queue_depth(redis_client, keys))
                )
                live.refresh()
            elif show:
                for step in steps[printed:]:
                    console.print(_step_line(step))
                printed = len(steps)
            time.sleep(poll_s)
    redis_client.close()


def _step_line(step: dict) -> str:
    parts = [f"step {int(step.get('step', 0))}"]
    parts += [f"{k}={step[k]:.4f}" for k in ("loss", "conflict_ratio", "keep_ratio") if k in step]
    parts += [f"{k}={v:.3f}" for k, v in step.items() if k.startswith("reward_mean/")]
    return "  ".join(parts)


class _Null:
    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


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
