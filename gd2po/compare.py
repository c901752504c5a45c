"""Several runs side by side (``gd2po compare RUN_DIR ...``): the paper's comparisons — GRPO vs GDPO vs
GD²PO-Hard vs GD²PO-SNR on the same job — as one figure (a panel per reward mean and filter ratio, a line
per run) and one table (last and mean value per run)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import yaml
from rich.console import Console
from rich.table import Table

from gd2po.report import series
from gd2po.runlog import read_steps, reward_names

FILTER_SIGNALS = ("conflict_ratio", "keep_ratio")


def run_label(run_dir: Path) -> str:
    """Folder name and estimator (from the run's effective config.yaml), e.g. ``tool-calling-gdpo · gdpo``."""
    config_file = Path(run_dir) / "config.yaml"
    estimator = None
    if config_file.is_file():
        trainer = (yaml.safe_load(config_file.read_text()) or {}).get("trainer", {})
        estimator = trainer.get("advantage", {}).get("estimator")
    return f"{Path(run_dir).name} · {estimator}" if estimator else Path(run_dir).name


def load_runs(run_dirs: list[Path]) -> dict[str, list[dict]]:
    """Label → step records; a folder without records is an error naming it."""
    runs: dict[str, list[dict]] = {}
    for run_dir in run_dirs:
        steps = read_steps(run_dir)
        if not steps:
            raise FileNotFoundError(f"no step records in {Path(run_dir) / 'metrics.jsonl'}")
        label = run_label(run_dir)
        while label in runs:
            label += "'"
        runs[label] = steps
    return runs


def signals(runs: dict[str, list[dict]]) -> list[str]:
    """Every reward mean any run logged, then the filter ratios."""
    names: list[str] = []
    for steps in runs.values():
        names += [n for n in reward_names(steps) if n not in names]
    return [f"reward_mean/{n}" for n in names] + list(FILTER_SIGNALS)


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    """signal → run label → (last value, mean over steps); runs that did not log a signal are absent."""
    summary: dict[str, dict[str, tuple[float, float]]] = {}
    for signal in signals(runs):
        for label, steps in runs.items():
            _, values = series(steps, signal)
            if values:
                summary.setdefault(signal, {})[label] = (values[-1], sum(values) / len(values))
    return summary


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    keys = signals(runs)
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for label, steps in runs.items():
            ax.plot(*series(steps, key), marker="o", markersize=3, label=label)
        ax.set(title=key.removeprefix("reward_mean/"), xlabel="step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summary: dict[str, dict[str, tuple[float, float]]], labels: list[str]) -> Table:
    result = Table(title="Runs compared: last value (mean over steps)")
    result.add_column("signal", no_wrap=True)
    for label in labels:
        result.add_column(label, justify="right")
    for signal, by_run in summary.items():
        cells = [f"{by_run[x][0]:.3f} ({by_run[x][1]:.3f})" if x in by_run else "—" for x in labels]
        result.add_row(signal, *cells)
    return result


def write_comparison(run_dirs: list[Path], out_dir: Path, *, show: bool = True) -> list[Path]:
    """comparison.png and comparison.txt in ``out_dir``."""
    runs = load_runs(run_dirs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure, text = out_dir / "comparison.png", out_dir / "comparison.txt"
    plot(runs, figure)
    rendered = table(summarise(runs), list(runs))
    recorder = Console(record=True, width=160, file=io.StringIO())
    recorder.print(rendered)
    text.write_text(recorder.export_text())
    if show:
        Console().print(rendered)
    return [figure, text]
