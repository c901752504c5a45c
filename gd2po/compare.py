"""Several runs side by side (``gd2po compare RUN_DIR ...``): the paper's comparisons — GRPO vs GDPO vs
GD²PO-Hard vs GD²PO-SNR on the same job — as one figure (a panel per reward mean and filter ratio, a line
per arm) and one table (last and mean value per arm).

Runs whose effective configs differ only in their seed (:data:`SEED_KEYS`) are one *arm*: the figure
draws the arm's mean curve across seeds with a band (min–max across seeds, or ±1 sample sd), the table
gives the arm's last value as the mean across seeds with the same spread. A run alone is a line, as
before. ``gd2po sweep`` ends with this comparison over its runs."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gd2po.report import series
from gd2po.runlog import read_steps, reward_names

FILTER_SIGNALS = ("conflict_ratio", "keep_ratio")
# Keys that differ between seeds of one arm: the seed itself, the prompt order it implies by default,
# and the run's name and folder.
SEED_KEYS = ("run.seed", "run.name", "run.output_dir", "data.shuffle_seed")
Band = Literal["minmax", "sd"]


def _config(run_dir: Path) -> dict:
    config_file = Path(run_dir) / "config.yaml"
    return (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}


def run_label(run_dir: Path) -> str:
    """Folder name and estimator (from the run's effective config.yaml), e.g. ``tool-calling-gdpo · gdpo``."""
    estimator = _config(run_dir).get("trainer", {}).get("advantage", {}).get("estimator")
    return f"{Path(run_dir).name} · {estimator}" if estimator else Path(run_dir).name


def arm_key(run_dir: Path) -> str:
    """The run's effective config without :data:`SEED_KEYS`, as canonical JSON: equal keys, one arm."""
    config = _config(run_dir)
    for dotted in SEED_KEYS:
        section, _, name = dotted.partition(".")
        if isinstance(config.get(section), dict):
            config[section].pop(name, None)
    return json.dumps(config, sort_keys=True, default=str)


def group_arms(run_dirs: list[Path]) -> dict[str, list[Path]]:
    """Arm label → its run folders, in the order first seen. A run alone keeps :func:`run_label`; an arm
    of several seeds is named by the folder that holds its runs when that folder is its own (the layout of
    ``gd2po sweep``: ``SWEEP/<arm>/seed-N``), else by its first run, plus its estimator and seed count."""
    by_key: dict[str, list[Path]] = {}
    for run_dir in run_dirs:
        by_key.setdefault(arm_key(run_dir), []).append(Path(run_dir))
    parents = [{d.resolve().parent for d in dirs} for dirs in by_key.values()]
    arms: dict[str, list[Path]] = {}
    for (_, dirs), own in zip(by_key.items(), parents, strict=True):
        if len(dirs) == 1:
            label = run_label(dirs[0])
        else:
            shared = len(own) == 1 and sum(p == own for p in parents) == 1
            name = next(iter(own)).name if shared else dirs[0].name
            estimator = run_label(dirs[0]).partition(" · ")[2]
            label = f"{name} · {estimator}" if estimator else name
            label += f" × {len(dirs)} seeds"
        while label in arms:
            label += "'"
        arms[label] = dirs
    return arms


def load_runs(run_dirs: list[Path]) -> dict[str, list[list[dict]]]:
    """Arm label → the step records of each of its runs; a folder without records is an error naming it."""
    runs: dict[str, list[list[dict]]] = {}
    for label, dirs in group_arms(run_dirs).items():
        runs[label] = []
        for run_dir in dirs:
            steps = read_steps(run_dir)
            if not steps:
                raise FileNotFoundError(f"no step records in {Path(run_dir) / 'metrics.jsonl'}")
            runs[label].append(steps)
    return runs


@dataclass(frozen=True)
class Curve:
    """One signal of one arm across its seeds, on the steps every seed logged."""

    steps: list[float]
    mean: list[float]  # per step, mean across seeds
    low: list[float]  # per step, lower edge of the band (= mean for a single run)
    high: list[float]  # per step, upper edge of the band
    seeds: int


def curve(seed_runs: list[list[dict]], signal: str, band: Band = "minmax") -> Curve | None:
    """The arm's mean curve and band for ``signal``; None when no run logged it. Steps missing in any
    run that logged the signal are left out, so every point averages the same seeds. ``band``:
    ``minmax`` spans the seeds' values, ``sd`` is mean ± the sample standard deviation (n − 1)."""
    per_run = [dict(zip(*series(steps, signal), strict=True)) for steps in seed_runs]
    per_run = [values for values in per_run if values]
    if not per_run:
        return None
    steps = sorted(set.intersection(*(set(values) for values in per_run)))
    mean, low, high = [], [], []
    for step in steps:
        values = [run[step] for run in per_run]
        centre = sum(values) / len(values)
        if band == "sd":
            spread = (
                math.sqrt(sum((v - centre) ** 2 for v in values) / (len(values) - 1))
                if len(values) > 1
                else 0.0
            )
            lower, upper = centre - spread, centre + spread
        else:
            lower, upper = min(values), max(values)
        mean.append(centre)
        low.append(lower)
        high.append(upper)
    return Curve(steps, mean, low, high, len(per_run))


def signals(runs: dict[str, list[list[dict]]]) -> list[str]:
    """Every reward mean any run logged, then the filter ratios."""
    names: list[str] = []
    for seed_runs in runs.values():
        for steps in seed_runs:
            names += [n for n in reward_names(steps) if n not in names]
    return [f"reward_mean/{n}" for n in names] + list(FILTER_SIGNALS)


@dataclass(frozen=True)
class Final:
    """An arm's summary of one signal: its last step's value and its mean over steps (both means across
    seeds), and the band of the last step's value."""

    last: float
    mean: float
    low: float
    high: float
    seeds: int


def summarise(runs: dict[str, list[list[dict]]], band: Band = "minmax") -> dict[str, dict[str, Final]]:
    """signal → arm label → :class:`Final`; arms that did not log a signal are absent."""
    summary: dict[str, dict[str, Final]] = {}
    for signal in signals(runs):
        for label, seed_runs in runs.items():
            found = curve(seed_runs, signal, band)
            if found is not None and found.steps:
                summary.setdefault(signal, {})[label] = Final(
                    found.mean[-1],
                    sum(found.mean) / len(found.mean),
                    found.low[-1],
                    found.high[-1],
                    found.seeds,
                )
    return summary


def plot(runs: dict[str, list[list[dict]]], path: Path, band: Band = "minmax") -> None:
    keys = signals(runs)
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for label, seed_runs in runs.items():
            found = curve(seed_runs, key, band)
            if found is None:
                continue
            (line,) = ax.plot(found.steps, found.mean, marker="o", markersize=3, label=label)
            if found.seeds > 1:
                ax.fill_between(found.steps, found.low, found.high, color=line.get_color(), alpha=0.18)
        ax.set(title=key.removeprefix("reward_mean/"), xlabel="step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), frameon=False)
    if any(len(seed_runs) > 1 for seed_runs in runs.values()):
        what = "min–max" if band == "minmax" else "±1 sd"
        fig.suptitle(f"mean across seeds, band: {what} across seeds", fontsize=9)
    legend_rows = math.ceil(len(labels) / 3)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * legend_rows, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summary: dict[str, dict[str, Final]], labels: list[str], band: Band = "minmax") -> Table:
    what = "[min, max] across seeds" if band == "minmax" else "[mean ± 1 sd] across seeds"
    result = Table(title=escape(f"Runs compared: last value {what} (mean over steps)"))
    result.add_column("signal", no_wrap=True)
    for label in labels:
        result.add_column(escape(label), justify="right")
    for signal, by_arm in summary.items():
        cells = []
        for label in labels:
            final = by_arm.get(label)
            if final is None:
                cells.append("—")
            elif final.seeds > 1:
                cells.append(f"{final.last:.3f} [{final.low:.3f}, {final.high:.3f}] ({final.mean:.3f})")
            else:
                cells.append(f"{final.last:.3f} ({final.mean:.3f})")
        result.add_row(signal, *map(escape, cells))  # "[low, high]" is not rich markup
    return result


def write_comparison(
    run_dirs: list[Path], out_dir: Path, *, show: bool = True, band: Band = "minmax"
) -> list[Path]:
    """comparison.png and comparison.txt in ``out_dir``."""
    runs = load_runs(run_dirs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure, text = out_dir / "comparison.png", out_dir / "comparison.txt"
    plot(runs, figure, band)
    rendered = table(summarise(runs, band), list(runs), band)
    recorder = Console(record=True, width=200, file=io.StringIO())
    recorder.print(rendered)
    text.write_text(recorder.export_text())
    if show:
        Console().print(rendered)
    return [figure, text]
