"""Helpers for the end-to-end tests: a tiny-model experiment config, watching a running ``gd2po up``
through its services.json manifest, and scraping every service's /metrics while it runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from gd2po.processes import processes_in_sessions

REPO_ROOT = Path(__file__).resolve().parents[2]


def tiny_stack_config(
    tmp_path: Path,
    model_dir: Path,
    *,
    steps: int = 4,
    correctness_replicas: int = 1,
    synchronous: bool = False,
    cold_start: bool = False,
    conflict_map_sources: int = 0,
) -> Path:
    """The demo config shrunk to a tiny model and short responses so a few steps take seconds; with
    ``cold_start`` its SFT stage runs too (2 examples, cached under ``tmp_path``), else it is left out."""
    config = yaml.safe_load((REPO_ROOT / "configs" / "tool_calling_smollm2_cpu.yaml").read_text())
    config["run"] = {"name": "e2e", "output_dir": str(tmp_path / "runs" / "e2e"), "seed": 0}
    if cold_start:
        config["sft"].update(
            max_examples=2, batch_size=2, max_tokens=2000, output_root=str(tmp_path / "models")
        )
    else:
        del config["sft"]
    config["model"].update(path=str(model_dir), max_response_tokens=16, max_prompt_tokens=2048)
    config["rewards"][0]["launch"]["replicas"] = correctness_replicas
    # Its own batch shape, whatever the demo's: 2 prompts × 4 rollouts a step.
    config["rollout"].update(group_size=4, prompts_per_batch=2, max_backlog=6)
    config["trainer"].update(
        total_steps=steps,
        prompts_per_step=2,
        max_staleness=2,
        lr=1e-4,
        conflict_map_sources=conflict_map_sources,
    )
    config["trainer"]["checkpoint"] = {"every": steps}
    config["synchronous"] = synchronous
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


_STARTED: list[subprocess.Popen] = []  # every run start_gd2po_up began: stop_leftover_runs ends them


def start_gd2po_up(
    config: Path, run_dir: Path, env: dict[str, str], extra: tuple[str, ...] = ()
) -> subprocess.Popen:
    """``gd2po up`` in the background (stdout and stderr piped, as text). A run still going when its
    test ends, passed or failed, is stopped by tests/e2e/conftest.py (:func:`stop_leftover_runs`)."""
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "gd2po.cli", "up", str(config)),
            *("--run-dir", str(run_dir), "--no-progress", *extra),
        ],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _STARTED.append(process)
    return process


def stop_run(process: subprocess.Popen) -> str:
    """Stop a running ``gd2po up`` as Ctrl-C does (SIGINT: it stops its services), SIGKILL if that takes
    over a minute; return its output."""
    process.send_signal(signal.SIGINT)
    try:
        return process.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[0]


def stop_leftover_runs() -> None:
    """Stop every run :func:`start_gd2po_up` began that is still going — a test that failed between
    starting a run and finishing it would otherwise leave the whole stack running."""
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:
            stop_run(process)


def finish(process: subprocess.Popen, timeout: float) -> str:
    """Wait up to ``timeout`` seconds for a ``gd2po up`` to end and return its output. On timeout the run
    is stopped (SIGINT: it stops its services, as on Ctrl-C; SIGKILL if that takes over a minute) and the
    test fails with the output's tail, so a hung run never outlives its test."""
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        output = stop_run(process)
        raise AssertionError(f"gd2po up did not finish within {timeout:.0f} s:\n{output[-4000:]}") from None


def wait_for_manifest(run_dir: Path, process: subprocess.Popen, timeout: float = 120) -> dict:
    path = run_dir / "services.json"
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"gd2po up never wrote services.json:\n{process.communicate()[0]}")
        time.sleep(0.2)
    return json.loads(path.read_text())


def scrape_all(manifest: dict) -> dict[str, str]:
    """name → /metrics text for every HTTP service that answers right now."""
    scraped = {}
    with httpx.Client(timeout=3.0) as client:
        for service in manifest["services"]:
            if service["url"]:
                try:
                    response = client.get(f"{service['url']}/metrics")
                except httpx.TransportError:
                    continue
                if response.status_code == 200:
                    scraped[service["name"]] = response.text
    return scraped


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def processes_in_session(sid: int) -> list[int]:
    """PIDs still alive in a session (each child of the stack leads its own session)."""
    return sorted(processes_in_sessions({sid}))


def allowed_cpus(pid: int) -> str:
    """The CPU list the kernel lets a process run on (what `taskset -c` set)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(
        line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list")
    )


def settled_cpus(pid: int, expected: str, timeout: float = 15.0) -> str:
    """The process's CPU list once it equals ``expected`` (or the last one read at the timeout): a child
    is listed as soon as it is spawned, a moment before `taskset` has applied the mask and exec'd."""
    deadline = time.monotonic() + timeout
    while (current := allowed_cpus(pid)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return current


TOY_PROMPTS = 64


def toy_learning_config(
    tmp_path: Path,
    model_dir: Path,
    *,
    steps: int,
    publish_every: int = 1,
    seed: int = 0,
    lr: float = 1e-4,
    lora: dict | None = None,
) -> Path:
    """The learning task: the toy character policy (gd2po.models.build_toy_policy) answering short
    letter strings, scored by two generic reward services — ``short`` (closeness to 2 characters: learnt
    by ending the answer early) and ``vowel`` (the answer starts with a vowel: learnt by one logit of
    the first token). Both vary within a group from the first step, neither is reachable by chance
    alone, and they pull slightly against each other (a vowel is a character), so GD²PO filters some
    rollouts. ``publish_every=0`` is the control: the trainer trains but the rollout never sees it.
    ``lora`` is a ``trainer.lora`` section (adapters instead of the full model)."""
    import random

    rng = random.Random(seed)
    prompts = tmp_path / "toy_prompts.jsonl"
    with prompts.open("w") as out:
        for _ in range(TOY_PROMPTS):
            text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(rng.randint(4, 12)))
            out.write(json.dumps({"prompt": text.strip() or "a"}) + "\n")
    config = {
        "run": {"name": "learning", "output_dir": str(tmp_path / "runs" / "learning"), "seed": seed},
        "model": {
            "path": str(model_dir),
            "dtype": "float32",
            "max_prompt_tokens": 32,
            "max_response_tokens": 16,
        },
        "data": {"train_files": [str(prompts)], "prompt_field": "prompt", "label_field": None},
        "rewards": [
            {
                "name": "short",
                "url": "http://127.0.0.1:1",
                "launch": {
                    "scorer": "generic.length_target",
                    "options": {"target": 2, "tolerance": 16, "unit": "chars"},
                },
            },
            {
                "name": "vowel",
                "url": "http://127.0.0.1:1",
                "launch": {"scorer": "generic.regex", "options": {"pattern": "^[aeiou]"}},
            },
        ],
        "rollout": {"group_size": 8, "prompts_per_batch": 8, "temperature": 1.0, "max_backlog": 8},
        "trainer": {
            "advantage": {"estimator": "gd2po_snr"},
            "prompts_per_step": 8,
            "lr": lr,
            "lora": lora,
            "total_steps": steps,
            "max_staleness": 1,
            "publish": {"every": publish_every},
            "checkpoint": {"every": steps},
            "deepspeed": {
                "zero_optimization": {"stage": 0},
                "gradient_clipping": 1.0,
                "train_micro_batch_size_per_gpu": 64,
                "gradient_accumulation_steps": 1,
            },
        },
    }
    path = tmp_path / "learning.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
