"""End-of-run summary and plots (``gd2po report RUN_DIR`` regenerates them from ``metrics.jsonl``)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from gd2po.learning import MIN_STEPS, moving_average, normalised_total, quarter_rise, quarters
from gd2po.runlog import read_steps, reward_names, reward_ranges

RATIOS = ("conflict_ratio", "drop_ratio", "keep_ratio")


def series(steps: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(float(s["step"]), float(s[key])) for s in steps if key in s and "step" in s]
    return [p[0] for p in points], [p[1] for p in points]


def plot_rewards(steps: list[dict], path: Path, ranges: dict[str, tuple[float, float]] | None = None) -> None:
    """One panel per reward (its per-step mean, faint, and a trailing mean over an eighth of the run once
    that is 2 steps or more), plus the range-normalised total: rewards on different scales each get their
    own axis."""
    names = reward_names(steps)
    panels = len(names) + (len(names) > 1)
    fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.4), squeeze=False)
    window = len(steps) // 8
    curves = {name: series(steps, f"reward_mean/{name}") for name in names}
    if len(names) > 1:
        total = normalised_total({n: v for n, (_, v) in curves.items()}, ranges or {})
        curves["total (range-normalised)"] = (curves[names[0]][0][: len(total)], total)
    for ax, (name, (x, y)) in zip(axes[0], curves.items(), strict=False):
        ax.plot(x, y, alpha=0.35, marker=".", linewidth=0.8, label="per step")
        if window >= 2:  # a "mean" of one step would repeat the per-step curve
            ax.plot(x, moving_average(y, window), linewidth=2, label=f"trailing mean of {window} steps")
        ax.set(xlabel="step", title=name)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean reward")
    axes[0][0].legend(fontsize=8)
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


def summary_table(steps: list[dict], ranges: dict[str, tuple[float, float]] | None = None) -> Table:
    """Per signal: mean of the first and of the last quarter of steps, the run's mean, and — for the
    rewards — the rise in pooled standard deviations (gd2po.learning: "rose" beyond 2, from 16 steps on)."""
    table = Table(title=f"Run summary ({len(steps)} steps)")
    for column in ("signal", "first ¼", "last ¼", "mean", "rise (pooled sd)"):
        table.add_column(column, justify="left" if column == "signal" else "right", no_wrap=True)
    names = reward_names(steps)
    rows = {f"reward_mean/{n}": series(steps, f"reward_mean/{n}")[1] for n in names}
    if len(names) > 1:
        rows["reward total (range-norm.)"] = normalised_total(
            {n: rows[f"reward_mean/{n}"] for n in names}, ranges or {}
        )
    rows.update({key: series(steps, key)[1] for key in (*RATIOS, "loss")})
    for key, values in rows.items():
        if not values:
            continue
        head, tail = quarters(values)
        first, last = sum(head) / len(head), sum(tail) / len(tail)
        rise = ""
        if key.startswith("reward") and len(values) >= 8:
            verdict = quarter_rise(values)
            rise = f"{verdict.in_sd:+.1f}" + (" rose" if verdict.rose() and len(values) >= MIN_STEPS else "")
        table.add_row(key, f"{first:.4f}", f"{last:.4f}", f"{sum(values) / len(values):.4f}", rise)
    return table


def write_report(run_dir: Path, *, show: bool = True) -> list[Path]:
    """Write rewards.png, filter_ratios.png and summary.txt into ``run_dir``; print the table."""
    run_dir = Path(run_dir)
    steps = read_steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"no step records in {run_dir / 'metrics.jsonl'}")
    outputs = [run_dir / "rewards.png", run_dir / "filter_ratios.png", run_dir / "summary.txt"]
    ranges = reward_ranges(run_dir)
    plot_rewards(steps, outputs[0], ranges)
    plot_ratios(steps, outputs[1])
    table = summary_table(steps, ranges)
    recorder = Console(record=True, width=100, file=io.StringIO())
    recorder.print(table)
    outputs[2].write_text(recorder.export_text())
    if show:
        Console().print(table)
        Console().print(f"plots: {outputs[0]}  {outputs[1]}")
    return outputs
