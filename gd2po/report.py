"""End-of-run summary and plots (``gd2po report RUN_DIR`` regenerates them from ``metrics.jsonl``)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from gd2po.runlog import read_steps, reward_names

RATIOS = ("conflict_ratio", "drop_ratio", "keep_ratio")


def series(steps: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(float(s["step"]), float(s[key])) for s in steps if key in s and "step" in s]
    return [p[0] for p in points], [p[1] for p in points]


def plot_rewards(steps: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in reward_names(steps):
        ax.plot(*series(steps, f"reward_mean/{name}"), marker="o", label=name)
    ax.set(xlabel="step", ylabel="mean reward", title="Per-reward mean")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ratios(steps: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in RATIOS:
        ax.plot(*series(steps, key), marker="o", label=key.replace("_", " "))
    ax.set(xlabel="step", ylabel="fraction of rollouts", ylim=(-0.02, 1.02), title="GD²PO conflict filter")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(steps: list[dict]) -> Table:
    """First vs last step for each reward mean and filter ratio."""
    table = Table(title=f"Run summary ({len(steps)} steps)")
    for column in ("signal", "first", "last", "mean"):
        table.add_column(column, justify="left" if column == "signal" else "right")
    keys = [f"reward_mean/{n}" for n in reward_names(steps)] + [*RATIOS, "loss"]
    for key in keys:
        _, values = series(steps, key)
        if values:
            table.add_row(key, f"{values[0]:.4f}", f"{values[-1]:.4f}", f"{sum(values) / len(values):.4f}")
    return table


def write_report(run_dir: Path, *, show: bool = True) -> list[Path]:
    """Write rewards.png, filter_ratios.png and summary.txt into ``run_dir``; print the table."""
    run_dir = Path(run_dir)
    steps = read_steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"no step records in {run_dir / 'metrics.jsonl'}")
    outputs = [run_dir / "rewards.png", run_dir / "filter_ratios.png", run_dir / "summary.txt"]
    plot_rewards(steps, outputs[0])
    plot_ratios(steps, outputs[1])
    table = summary_table(steps)
    recorder = Console(record=True, width=100, file=io.StringIO())
    recorder.print(table)
    outputs[2].write_text(recorder.export_text())
    if show:
        Console().print(table)
        Console().print(f"plots: {outputs[0]}  {outputs[1]}")
    return outputs
