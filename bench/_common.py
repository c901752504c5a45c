"""Tiny helpers shared by the benchmarks: machine and version facts, load, and RESULTS.md sections."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from gd2po.environment import process_environment

RESULTS = Path(__file__).with_name("RESULTS.md")
REPO = Path(__file__).resolve().parents[1]
ENV = process_environment(REPO)  # for the processes a bench starts itself


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def machine() -> str:
    """One line: CPU model, cores usable by this process, total memory."""
    pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return f"{cpu_model()}, nproc {len(os.sched_getaffinity(0))}, {pages * size / 2**30:.0f} GiB RAM"


def versions(*packages: str) -> str:
    found = []
    for name in packages:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def load() -> str:
    """`uptime`-style load averages (1, 5, 15 min): the machine is shared, so record them."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def mem_available_gib() -> float:
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def write_section(title: str, body: str, path: Path = RESULTS) -> None:
    """Replace the ``## title`` section of RESULTS.md (or append it), leaving other sections alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


def gd2po_up_command(config: Path, run_dir: Path, *extra: str) -> list[str]:
    """`gd2po up CONFIG --run-dir RUN_DIR --no-progress [extra]` with this interpreter."""
    return [
        *(sys.executable, "-m", "gd2po.cli", "up", str(config)),
        *("--run-dir", str(run_dir), "--no-progress", *extra),
    ]


DEMO_GROUP_SHAPE = (550, 70, 4)
"""(prompt tokens, answer tokens, rollouts) of one demo group: the shape the trainer benches time."""


def demo_shaped_group(vocabulary: int) -> tuple:
    """One group of the demo's shape with random tokens (seed 0): input ids [G, P + A] (one prompt shared
    by the G rollouts, so the trainer forwards it once), attention mask [G, P + A] and response mask
    [G, P + A − 1] (1 on the answer targets)."""
    import torch

    prompt_len, answer_len, group = DEMO_GROUP_SHAPE
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocabulary, (1, prompt_len), generator=generator).expand(group, prompt_len)
    answers = torch.randint(0, vocabulary, (group, answer_len), generator=generator)
    ids = torch.cat([prompt, answers], dim=1)
    response = torch.zeros(group, prompt_len + answer_len - 1)
    response[:, prompt_len - 1 :] = 1
    return ids, torch.ones_like(ids), response


def run_arm(module: str, arm: str, *options: str) -> dict:
    """Run ``python -m MODULE --arm ARM OPTIONS`` (a bench measuring one arm in a process of its own, so
    its peak memory and runtime are its own) and return the JSON it prints on a ``RESULT=`` line; exits
    with the child's output tails when there is none."""
    child = subprocess.run(
        [sys.executable, "-m", module, "--arm", arm, *options],
        cwd=REPO,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        check=False,
    )
    line = next((x for x in child.stdout.splitlines() if x.startswith("RESULT=")), None)
    if line is None:
        raise SystemExit(f"arm {arm} failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT="))


def ratio_table(
    names: tuple[str, str], figures: tuple[dict, dict], rows: list[tuple[str, str, str]]
) -> list[str]:
    """A markdown table comparing two arms: one line per ``(label, key, format)`` in ``rows`` with both
    arms' values and the second over the first (nan when the first is 0)."""
    (first, second), (a, b) = names, figures
    lines = [f"| | {first} | {second} | {second} / {first} |", "|---|---|---|---|"]
    for label, key, form in rows:
        ratio = b[key] / a[key] if a[key] else float("nan")
        lines.append(f"| {label} | {form.format(a[key])} | {form.format(b[key])} | {ratio:.3f} |")
    return lines
