"""The live view of a running stack: trainer steps from the run log, queue depth from Redis and
generation speed from the rollout service's metrics, refreshed about once a second."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

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
        table.add_row(f"reward {name} (mean)", f"{last.get(f'reward_mean/{name}', float('nan')):.3f}")
    for key in ("conflict_ratio", "drop_ratio", "keep_ratio", "loss"):
        if key in last:
            table.add_row(key, f"{last[key]:.4f}")
    table.add_row("rollout tokens/s", f"{rollout.get('gd2po_rollout_tokens_per_second', 0.0):.1f}")
    table.add_row("rollout policy version", f"{int(rollout.get('gd2po_rollout_policy_version', 0))}")
    table.add_row("queue depth", "?" if depth is None else str(depth))
    return table


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
