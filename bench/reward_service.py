"""Benchmark the tool-call correctness reward service over HTTP against scoring in-process.

Run from the repository root: `python -m bench.reward_service`. The service runs in its own process
(`python -m reward_service --scorer tool_call.correctness`), as in production. Items are real prompts
and ground truths of data/tool_calling with completions derived from the ground truth by realistic
mistakes (wrong value type, missing parameter, wrong tool, broken JSON, …) after a real R1 think block,
so scores spread over [-3, 3]; requests carry the full chat prompt, as the rollout service sends it. Target (ISSUE 4, 2-core
machine): ≥ 3,000 items/s and p99 ≤ 100 ms at batch 64. The server's CPU time per request is printed
too: unlike latency it barely depends on what else the machine is running.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pyarrow.parquet as pq
import typer
from rich.console import Console
from rich.table import Table

from gd2po.redis_server import free_port
from proto import ScoreItem
from reward_service.scorers import build_scorer

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("data/tool_calling/rlla_sft400/train.parquet", "data/tool_calling/rlla_4k/test.parquet")
THINKS = "data/tool_calling/rlla_4k_raw/rlla_sft.json"  # real reasoning distilled from DeepSeek-R1


def _thinks() -> list[str]:
    outputs = [row["output"] for row in json.loads((ROOT / THINKS).read_text())]
    return [out.split("</think>", 1)[0] + "</think>" for out in outputs if out.startswith("<think>")]


def _perturb(calls: list[dict], rng: random.Random) -> str:
    """One tool-call block with a typical policy mistake (or none)."""
    calls = json.loads(json.dumps(calls))
    call = rng.choice(calls)
    params = call["parameters"]
    mistake = rng.choice(["exact", "exact", "retype", "drop", "rename", "extra", "broken", "answer"])
    if mistake == "retype" and params:
        key = rng.choice(list(params))
        value = params[key]
        params[key] = int(value) if isinstance(value, str) and value.isdigit() else str(value)
    elif mistake == "drop" and params:
        params.pop(rng.choice(list(params)))
    elif mistake == "rename":
        call["name"] += "V2"
    elif mistake == "extra":
        calls.append({"name": "Search", "parameters": {"query": "more"}})
    elif mistake == "answer":
        return "<response> I cannot do that right now. </response>"
    lines = "\n".join(json.dumps(c) for c in calls)
    if mistake == "broken":
        lines = lines[:-1]
    return f"<tool_call>\n{lines}\n</tool_call>"


def load_items(count: int, group: int = 8, seed: int = 0) -> list[dict]:
    """``count`` request items in GRPO order: ``group`` consecutive completions of each prompt (cycling
    over the datasets' rows), each completion with its own think block and mistake."""
    rows = [row for path in DATASETS for row in pq.read_table(ROOT / path).to_pylist()]
    thinks = _thinks()
    rng = random.Random(seed)
    items = []
    for k in range(count):
        row = rows[(k // group) % len(rows)]
        truth = row["reward_model"]["ground_truth"]
        if "<tool_call>" in truth:
            block = truth.split("<tool_call>\n", 1)[1].split("\n</tool_call>", 1)[0]
            body = _perturb([json.loads(line) for line in block.split("\n")], rng)
        else:
            body = truth.split("</think>\n", 1)[1]
        items.append(
            {
                "id": f"{k}",
                "prompt": row["prompt"],
                "completion": f"{rng.choice(thinks)}\n{body}",
                "label": truth,
            }
        )
    return items


def in_process_rate(batches: list[list[dict]], repeats: int) -> tuple[float, list[float]]:
    """Items/s of the scorer called directly on pre-built ScoreItems, and the first pass's scores."""
    scorer = build_scorer("tool_call.correctness")
    parsed = [[ScoreItem.model_validate(item) for item in batch] for batch in batches]
    first = [value for batch in parsed for value in scorer.score(batch)]
    started = time.perf_counter()
    for _ in range(repeats):
        for batch in parsed:
            scorer.score(batch)
    return repeats * sum(map(len, parsed)) / (time.perf_counter() - started), first


def start_service(port: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "reward_service",
        "--scorer",
        "tool_call.correctness",
        "--port",
        str(port),
    ]
    process = subprocess.Popen(command, cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("the reward service did not become ready")


async def load(url: str, bodies: list[bytes], requests: int, concurrency: int) -> tuple[float, list[float]]:
    """Send ``requests`` pre-encoded batches, ``concurrency`` in flight; wall time and latencies."""
    latencies: list[float] = []
    sent = 0
    headers = {"content-type": "application/json"}

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests:
            body = bodies[sent % len(bodies)]
            sent += 1
            started = time.perf_counter()
            response = await client.post(f"{url}/v1/score", content=body, headers=headers)
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.perf_counter() - started, latencies


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main(
    batch: int = typer.Option(64, help="Items per request."),
    requests: int = typer.Option(1000, help="Requests per load level (the run stops by itself)."),
    concurrency: list[int] = typer.Option([1, 2, 4, 8], help="Requests in flight; one row each."),
    group: int = typer.Option(8, help="Completions per prompt (consecutive, as GRPO groups)."),
    distinct: int = typer.Option(4096, help="Distinct items (cycled)."),
) -> None:
    items = load_items(distinct, group)
    batches = [items[i : i + batch] for i in range(0, len(items) - batch + 1, batch)]
    bodies = [json.dumps({"items": b}).encode() for b in batches]
    local_rate, local_scores = in_process_rate(batches, repeats=5)

    port = free_port()
    service = start_service(port)
    url = f"http://127.0.0.1:{port}"
    runs = []
    try:
        headers = {"content-type": "application/json"}
        served = [
            r["score"]
            for body in bodies
            for r in httpx.post(f"{url}/v1/score", content=body, headers=headers).json()["results"]
        ]
        if served != local_scores:
            raise SystemExit("the service's scores differ from the in-process scorer's")
        asyncio.run(load(url, bodies, requests=50, concurrency=2))  # warm-up
        server = psutil.Process(service.pid)
        for level in concurrency:
            before, cpu = os.getloadavg()[0], server.cpu_times()
            wall, latencies = asyncio.run(load(url, bodies, requests=requests, concurrency=level))
            used = sum(server.cpu_times()[:2]) - sum(cpu[:2])  # user + system seconds
            runs.append(
                (level, requests * batch / wall, latencies, used / requests, before, os.getloadavg()[0])
            )
    finally:
        service.terminate()
        service.wait(timeout=20)

    spread = {value: local_scores.count(value) for value in (3.0, -3.0, 0.0)}
    console = Console(width=140)
    console.print(
        f"{platform.machine()}, {os.cpu_count()} CPUs; {len(bodies)} distinct bodies of {batch} items, "
        f"{group} completions per prompt, mean {sum(map(len, bodies)) / len(bodies) / 1024:.0f} KiB; scores: {spread[3.0]} × 3, "
        f"{spread[-3.0]} × -3, {spread[0.0]} × 0, {len(local_scores) - sum(spread.values())} partial; "
        f"in-process {local_rate:,.0f} items/s"
    )
    table = Table(
        title=f"tool_call.correctness over HTTP, batch {batch}, {requests} requests per row "
        "(target ≥ 3,000 items/s, p99 ≤ 100 ms)"
    )
    columns = (
        "in flight",
        "items/s",
        "p50 ms",
        "p99 ms",
        "HTTP / in-process",
        "server CPU ms/req",
        "load avg",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for level, rate, latencies, cpu, before, after in runs:
        p50, p99 = percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3
        style = "green" if rate >= 3000 and p99 <= 100 else "red"
        table.add_row(
            str(level),
            f"[{style}]{rate:,.0f}[/{style}]",
            f"{p50:.1f}",
            f"[{style}]{p99:.1f}[/{style}]",
            f"{rate / local_rate:.2f}",
            f"{cpu * 1e3:.2f}",
            f"{before:.1f} → {after:.1f}",
        )
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
