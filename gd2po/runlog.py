"""Reading the trainer's per-step JSONL log (``metrics.jsonl`` in the run folder)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
REWARDS_FILE = "rewards.json"  # name → /v1/info of each reward service, written by `gd2po up`


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become ``a/b`` keys so both flat and grouped records read the same way."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/" if name not in ("metrics", "train") else ""))
        else:
            flat[name] = value
    return flat


def read_steps(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete step record, in order (a half-written last line is ignored)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(flatten(json.loads(line)))
        except json.JSONDecodeError:
            continue
    return steps


def reward_names(steps: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for step in steps:
        for key in step:
            if key.startswith("reward_mean/") and key.split("/", 1)[1] not in names:
                names.append(key.split("/", 1)[1])
    return names


def reward_ranges(run_dir: Path) -> dict[str, tuple[float, float]]:
    """Each reward's declared (low, high) from the run's rewards.json; {} when absent (older runs)."""
    path = Path(run_dir) / REWARDS_FILE
    if not path.is_file():
        return {}
    ranges = {}
    for name, info in json.loads(path.read_text()).items():
        low, high = (info.get("range") or (None, None))[:2]
        if low is not None and high is not None:
            ranges[name] = (float(low), float(high))
    return ranges
