"""``gd2po sweep CONFIG --seeds N --vary KEY=A,B ...``: a grid of runs of one experiment, then their
comparison with bands across seeds.

The grid is the cross product of the ``--vary`` values (each an *arm*) times the seeds 0..N−1. Every run
is a ``gd2po up`` (:func:`gd2po.stack.run_stack`) of a small config file that ``extends:`` CONFIG and sets
the arm's keys and ``run.seed``, so a run merges exactly as an ``extends:`` file does: an arm naming
another ``trainer.advantage.estimator`` replaces the base's advantage mapping whole, and the base's
options of its own estimator (``tau`` of ``gd2po_snr``) never reach one that does not take them. When the
estimator is varied, other varied ``trainer.advantage.*`` options are given only to the estimators that
take them (``--vary trainer.advantage.estimator=gdpo,gd2po_snr --vary trainer.advantage.tau=0.5,0.9`` is
three arms, not four). Every run's config is validated before the first one starts.

Layout of the sweep folder: ``configs/<arm>-seed-<n>.yaml`` (what each run was given), ``<arm>/seed-<n>/``
(each run folder), ``sweep.json`` (the plan) and ``comparison/`` (``gd2po compare`` over every run). A run
folder already holding all its steps is kept, so a sweep cut short resumes by running the same command;
an unfinished one is started again from scratch.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from gd2po.compare import Band, write_comparison
from gd2po.restart import RestartPolicy
from gd2po.runlog import read_steps
from proto.config import (
    ADVANTAGE_VARIANTS,
    ESTIMATOR_NAMES,
    ConfigError,
    env_var,
    load_config,
    read_config_mapping,
)

ESTIMATOR_KEY = "trainer.advantage.estimator"
ADVANTAGE_PREFIX = "trainer.advantage."
SWEEP_FILE = "sweep.json"


class SweepError(ValueError):
    """A ``--vary`` that cannot be read, or an arm whose config does not load; says which and why."""


@dataclass(frozen=True)
class Arm:
    """One point of the grid: its folder name (``estimator=grpo,lr=1e-05``) and the keys it sets, as a
    nested mapping merged over the base config the way ``extends:`` merges."""

    name: str
    overrides: dict[str, Any]


@dataclass(frozen=True)
class PlannedRun:
    arm: Arm
    seed: int
    config_path: Path  # the file given to `gd2po up`
    run_dir: Path


def parse_vary(items: list[str]) -> list[tuple[str, list[Any]]]:
    """``["trainer.lr=1e-6,2e-6", ...]`` → ``[("trainer.lr", [1e-06, 2e-06]), ...]``; each value is read as
    YAML (numbers, booleans, strings). Raises SweepError for a missing ``=``, an empty value or a key
    given twice."""
    parsed: list[tuple[str, list[Any]]] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise SweepError(f"--vary {item!r}: expected KEY=VALUE[,VALUE...], e.g. trainer.lr=1e-6,2e-6")
        if key in (k for k, _ in parsed):
            raise SweepError(f"--vary {key} given twice; list all its values in one --vary")
        values = [part.strip() for part in raw.split(",")]
        if any(not value for value in values):
            raise SweepError(f"--vary {item!r}: an empty value between commas")
        parsed.append((key, [_value(value) for value in values]))
    return parsed


_EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _value(text: str) -> Any:
    # YAML 1.1 reads 1e-6 (no dot) as a string; on a command line it is meant as the number.
    return float(text) if _EXPONENT.match(text) else yaml.safe_load(text)


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    head, _, rest = dotted.partition(".")
    return {head: _nested(rest, value) if rest else value}


def _deep_update(target: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value
    return target


def _takes(estimator: Any, dotted: str) -> bool:
    """Whether the estimator named ``estimator`` has the advantage option ``dotted`` (unknown names: yes,
    so that validation reports them)."""
    if estimator not in ESTIMATOR_NAMES:
        return True
    option = dotted.removeprefix(ADVANTAGE_PREFIX).split(".", 1)[0]
    return option in ADVANTAGE_VARIANTS[ESTIMATOR_NAMES.index(estimator)].model_fields


def _label(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("/", "_").replace(" ", "")


def grid(vary: list[tuple[str, list[Any]]]) -> list[Arm]:
    """The cross product of the varied values, in the order given (the last key varies fastest). With the
    estimator varied, an advantage option an estimator does not take is left out of its arms, and arms
    that then coincide are kept once. No ``--vary``: one arm, ``base``."""
    if not vary:
        return [Arm("base", {})]
    keys = [key for key, _ in vary]
    arms: dict[str, Arm] = {}
    for values in itertools.product(*(values for _, values in vary)):
        chosen = dict(zip(keys, values, strict=True))
        if ESTIMATOR_KEY in chosen:
            estimator = chosen[ESTIMATOR_KEY]
            chosen = {
                k: v for k, v in chosen.items() if not k.startswith(ADVANTAGE_PREFIX) or _takes(estimator, k)
            }
        name = ",".join(f"{key.rsplit('.', 1)[-1]}={_label(value)}" for key, value in chosen.items())
        overrides: dict[str, Any] = {}
        # The estimator first, so that its options land in the mapping that names it.
        for key in sorted(chosen, key=lambda k: k != ESTIMATOR_KEY):
            _deep_update(overrides, _nested(key, chosen[key]))
        arms.setdefault(name, Arm(name, overrides))
    return list(arms.values())


def _dotted(mapping: dict[str, Any], prefix: str = "") -> set[str]:
    """The dotted keys of a nested mapping's leaves: ``{"a": {"b": 1}}`` → ``{"a.b"}``."""
    keys: set[str] = set()
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        keys |= _dotted(value, f"{name}.") if isinstance(value, dict) and value else {name}
    return keys


def run_config(base: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The mapping of a file that extends ``base`` (absolute path) with ``overrides``."""
    return {"extends": str(Path(base).resolve()), **overrides}


def plan(config: Path, arms: list[Arm], seeds: list[int], sweep_dir: Path) -> list[PlannedRun]:
    """Write each run's config file under ``sweep_dir/configs`` and validate it; every arm × seed, arms
    outermost. Raises SweepError listing every run whose config does not load."""
    config = Path(config).resolve()
    base_name = read_config_mapping(config).get("run", {}).get("name", config.stem)
    swept = {"run.seed", "run.name"}.union(*(_dotted(arm.overrides) for arm in arms))
    # The environment wins over a config file: an exported override of a swept key would give every run
    # the same value, silently.
    exported = sorted(env_var(key) for key in swept if env_var(key) in os.environ)
    if exported:
        raise SweepError(
            f"unset {', '.join(exported)}: it would override the value each run of the sweep sets"
        )
    (sweep_dir / "configs").mkdir(parents=True, exist_ok=True)
    runs, errors = [], []
    for arm, seed in itertools.product(arms, seeds):
        overrides = _deep_update(
            json.loads(json.dumps(arm.overrides)),  # a copy: arms share nothing
            {"run": {"seed": seed, "name": f"{base_name}-{arm.name}-seed-{seed}"}},
        )
        path = sweep_dir / "configs" / f"{arm.name}-seed-{seed}.yaml"
        path.write_text(yaml.safe_dump(run_config(config, overrides), sort_keys=False))
        try:
            load_config(path)
        except ConfigError as exc:
            errors.append(f"arm {arm.name}, seed {seed}: {exc}")
        runs.append(PlannedRun(arm, seed, path, sweep_dir / arm.name / f"seed-{seed}"))
    if errors:
        raise SweepError("the sweep would fail; no run was started:\n" + "\n".join(errors))
    return runs


def finished(run: PlannedRun) -> bool:
    """The run folder holds every step of the run (``trainer.total_steps``, or steps up to its
    ``trainer.total_samples`` budget) and its end-of-run summary."""
    trainer = load_config(run.config_path).trainer
    steps = read_steps(run.run_dir)
    if not (run.run_dir / "summary.txt").is_file() or not steps:
        return False
    budget = trainer.total_samples
    return len(steps) >= trainer.total_steps or (
        budget is not None and steps[-1].get("samples_read_total", 0) >= budget
    )


def run_sweep(
    config: Path,
    arms: list[Arm],
    seeds: list[int],
    sweep_dir: Path,
    *,
    progress: bool = True,
    band: Band = "minmax",
    compare: bool = True,
    pin: dict[str, str] | None = None,
    auto_pin: bool = True,
    restart: RestartPolicy | None = None,
    console: Console | None = None,
) -> list[PlannedRun]:
    """Run every arm (:func:`grid` of the ``--vary`` values, or arms built by hand) × seed one after the
    other through :func:`gd2po.stack.run_stack` (each a full ``gd2po up``), then, with ``compare``, write
    ``sweep_dir/comparison``. Returns the runs. Raises SweepError before any run when a config does not
    load, and :class:`gd2po.stack.StackError` when a run fails (the runs finished before it are kept; the
    same call resumes). ``pin``, ``auto_pin`` and ``restart`` are ``gd2po up``'s, for every run."""
    from gd2po.stack import run_stack

    console = console or Console()
    sweep_dir = Path(sweep_dir).resolve()
    runs = plan(config, arms, seeds, sweep_dir)
    manifest = {
        "config": str(Path(config).resolve()),
        "arms": {arm.name: arm.overrides for arm in arms},
        "seeds": seeds,
        "runs": [
            {"arm": r.arm.name, "seed": r.seed, "config": str(r.config_path), "run_dir": str(r.run_dir)}
            for r in runs
        ],
    }
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(manifest, indent=2))
    arms = len({r.arm.name for r in runs})
    console.print(f"[bold]sweep[/] {len(runs)} runs: {arms} arm(s) × {len(seeds)} seed(s) → {sweep_dir}")
    durations: list[float] = []
    for index, run in enumerate(runs, start=1):
        where = f"run {index}/{len(runs)} · {run.arm.name} · seed {run.seed}"
        if finished(run):
            console.print(f"[dim]{where}: already complete, kept[/]")
            continue
        left = len(runs) - index + 1
        eta = f" · about {sum(durations) / len(durations) * left / 60:.0f} min left" if durations else ""
        console.rule(f"{where}{eta}")
        if run.run_dir.exists():
            shutil.rmtree(run.run_dir)  # an unfinished run starts again: its steps would not be comparable
        started = time.monotonic()
        run_stack(
            run.config_path,
            run_dir=run.run_dir,
            progress=progress,
            pin=pin,
            auto_pin=auto_pin,
            restart=restart,
        )
        durations.append(time.monotonic() - started)
        console.print(f"{where}: done in {durations[-1]:.0f} s")
    if compare:
        write_comparison([r.run_dir for r in runs], sweep_dir / "comparison", show=progress, band=band)
    return runs
