"""Trainer step-time split for a ~10M-parameter model fed from a real Redis stream.

Run from the repository root: ``python -m bench.trainer`` (a few minutes on 2 cores) or ``--quick``.
Target (ISSUE 6): queue (data wait) + advantage computation < 2 % of the step time.

Method, and why:

* Model: a random Llama built locally (hidden 256, 4 layers, head_dim 64, a 24,576-token vocabulary,
  tied embeddings: ~10M parameters) saved to a temporary folder, fp32. Nothing comes from a hub.
* Data: a real Redis server process pre-filled with well-formed ScoredGroups (``proto`` codec):
  prompts and responses of realistic, varying lengths, sampled-token log-probs, G completions and
  K = 3 rewards (binary correctness and format, a continuous length reward pulling against long
  answers) drawn independently, so per-reward advantages disagree on part of every batch.
* Trainer: the real ``trainer.service.Trainer`` (DeepSpeed ZeRO-2, CPU/gloo, GD²PO-SNR), consuming
  the stream with its own consumer, publishing weights every step as in the demo config. The split is
  the trainer's own per-step record (its JSONL log, the same values as the
  ``gd2po_trainer_step_phase_seconds`` histogram); the first ``--warmup`` steps are left out. "Other"
  is the wall time between consecutive steps' records not covered by a phase (metrics, queue-depth
  queries, the JSONL write); the final checkpoint comes after the last record and is not counted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis
import torch
from rich.console import Console
from rich.table import Table

from bench._common import load, machine, utc_now, versions, write_section
from gd2po.models import save_random_llama
from gd2po.redis_server import RedisProcess
from gd2po.runlog import read_steps
from proto import Completion, ScoredGroup, encode
from proto.config import ExperimentConfig
from proto.keys import RedisKeys
from proto.stream import entry_fields
from trainer.metrics import PHASES

REPO = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN, LAYERS = 24_576, 256, 4
REWARDS = ("correctness", "format", "length")
LABELS = {  # one per trainer.metrics.PHASES (KeyError when a phase is added without its label)
    "wait": "data wait (XREADGROUP, decode, ledger)",
    "advantages": "advantages (batch tensors, GD²PO-SNR)",
    "conflict_map": "conflict map per data source (off unless trainer.conflict_map_sources)",
    "forward_backward": "forward/backward",
    "optimizer": "optimizer",
    "publish": "publish (safetensors, blake3, announce)",
}
console = Console(width=120)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Smoke run: tiny batches, two steps.")
    parser.add_argument("--prompts", type=int, default=4, help="Prompts (groups) per step.")
    parser.add_argument("--group-size", type=int, default=4, help="Completions per group (G).")
    parser.add_argument("--prompt-tokens", type=int, default=160, help="Mean prompt length.")
    parser.add_argument("--response-tokens", type=int, default=96, help="Max response length.")
    parser.add_argument("--steps", type=int, default=8, help="Measured steps.")
    parser.add_argument("--warmup", type=int, default=1, help="Leading steps left out of the figures.")
    parser.add_argument("--micro-batch", type=int, default=4, help="DeepSpeed micro batch (rollouts).")
    parser.add_argument("--no-record", action="store_true", help="Do not write bench/RESULTS.md.")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.group_size, args.prompt_tokens, args.response_tokens = 2, 2, 32, 16
        args.steps, args.micro_batch = 2, 2
    return args


def synthetic_group(index: int, args: argparse.Namespace, rng: torch.Generator) -> ScoredGroup:
    """One well-formed group: random tokens of varying lengths, negative log-probs, K = 3 rewards."""

    def ints(low: int, high: int, size: int = 1) -> list[int]:
        return torch.randint(low, high, (size,), generator=rng).tolist()

    prompt_len = ints(args.prompt_tokens // 2, args.prompt_tokens * 3 // 2)[0]
    completions, lengths = [], []
    for _ in range(args.group_size):
        length = ints(args.response_tokens // 4, args.response_tokens + 1)[0]
        lengths.append(length)
        completions.append(
            Completion(
                token_ids=ints(3, VOCAB, length),
                logprobs=(-torch.rand(length, generator=rng) * 4).tolist(),
                text="",
                finish_reason="length" if length == args.response_tokens else "stop",
            )
        )
    now = time.time()
    return ScoredGroup(
        group_id=f"bench-{index}",
        prompt_id=f"p{index}",
        prompt_token_ids=ints(3, VOCAB, prompt_len),
        completions=completions,
        rewards={
            "correctness": [float(x) for x in ints(0, 2, args.group_size)],
            "format": [float(x) for x in ints(0, 2, args.group_size)],
            "length": [1.0 - n / args.response_tokens for n in lengths],
        },
        policy_version=0,
        created_at=now,
        scored_at=now,
        producer_id="bench",
    )


def prefill(url: str, count: int, args: argparse.Namespace) -> None:
    keys, client = RedisKeys(), redis.Redis.from_url(url, socket_timeout=60)
    rng = torch.Generator().manual_seed(0)
    pipe = client.pipeline(transaction=False)
    for index in range(count):
        pipe.xadd(keys.groups, entry_fields(encode(synthetic_group(index, args, rng))))
    pipe.incrby(keys.produced, count)
    pipe.execute()
    client.close()


def experiment(args: argparse.Namespace, model_dir: Path, run_dir: Path, redis_url: str) -> ExperimentConfig:
    steps = args.warmup + args.steps
    rollouts = args.prompts * args.group_size
    return ExperimentConfig(
        run={"output_dir": run_dir},
        redis={"url": redis_url},
        model={"path": model_dir, "max_response_tokens": args.response_tokens},
        rewards=[{"name": name, "url": "http://127.0.0.1:1"} for name in REWARDS],  # scores are in Redis
        trainer={
            "advantage": {"estimator": "gd2po_snr", "tau": 0.8},
            "prompts_per_step": args.prompts,
            "lr": 1e-5,
            "total_steps": steps,
            "max_staleness": steps,  # every pre-filled group stays fresh enough to train
            "publish": {"every": 1, "keep_last": 2},
            "checkpoint": {"every": steps, "keep_last": 2},
            "deepspeed": {
                "zero_optimization": {"stage": 2},
                "gradient_clipping": 1.0,
                "train_micro_batch_size_per_gpu": args.micro_batch,
                "gradient_accumulation_steps": max(1, rollouts // args.micro_batch),
            },
        },
    )


def train(config: ExperimentConfig) -> list[dict]:
    from trainer.service import Trainer

    Trainer(config).run()
    return read_steps(config.run.output_dir)


def split(steps: list[dict], warmup: int) -> tuple[dict[str, float], float]:
    """Mean seconds per phase over the measured steps, and the mean wall time between their records."""
    measured = steps[warmup:]
    means = {phase: statistics.fmean(s[f"phase/{phase}"] for s in measured) for phase in PHASES}
    times = [s["time"] for s in steps[warmup - 1 :]]
    wall = (times[-1] - times[0]) / (len(times) - 1)
    return means, wall


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        work = Path(tmp)
        params = save_random_llama(
            work / "model",
            vocab_size=VOCAB,
            hidden=HIDDEN,
            layers=LAYERS,
            kv_heads=HIDDEN // 64,
            intermediate=3 * HIDDEN,
        )
        header = [
            f"machine: {machine()}, torch threads {torch.get_num_threads()}",
            f"versions: {versions('torch', 'deepspeed', 'transformers')}",
            f"model: random Llama, {params / 1e6:.1f}M parameters (hidden {HIDDEN}, {LAYERS} layers, "
            f"vocab {VOCAB}), fp32, DeepSpeed ZeRO-2, GD²PO-SNR (τ 0.8), K = 3 rewards",
            f"batch: {args.prompts} groups × G={args.group_size} per step, prompts ~{args.prompt_tokens} "
            f"tokens, responses ≤ {args.response_tokens}, micro batch {args.micro_batch}; "
            f"{args.warmup} warm-up + {args.steps} measured steps; publish every step",
        ]
        for line in header:
            console.print(line)
        with RedisProcess(work / "redis") as server:
            prefill(server.url, args.prompts * (args.warmup + args.steps), args)
            before = load()
            console.print(f"training … load {before}")
            steps = train(experiment(args, work / "model", work / "run", server.url))
            loads = f"{before} → {load()}"
    means, wall = split(steps, args.warmup)
    other = wall - sum(means.values())
    overhead = means["wait"] + means["advantages"]
    conflict = statistics.fmean(s["conflict_ratio"] for s in steps[args.warmup :])
    keep = statistics.fmean(s["keep_ratio"] for s in steps[args.warmup :])

    rows = [(LABELS[p], means[p]) for p in PHASES] + [("other (metrics, queue depth, JSONL)", other)]
    table = Table("phase", "mean ms / step", "% of step")
    for name, seconds in rows:
        table.add_row(name, f"{seconds * 1e3:.1f}", f"{seconds / wall:.2%}")
    table.add_row("[bold]step (wall)", f"[bold]{wall * 1e3:.1f}", "100%")
    console.print(table)
    summary = [
        f"queue + advantages: {overhead * 1e3:.1f} ms = {overhead / wall:.2%} of the step "
        f"(target < 2 %: {'met' if overhead / wall < 0.02 else 'missed'}); with the untimed remainder "
        f"{(overhead + other) / wall:.2%}",
        f"batches carried conflicts: mean conflict ratio {conflict:.2f}, keep ratio {keep:.2f}; "
        f"load 1/5/15 {loads}",
    ]
    for line in summary:
        console.print(line)
    if not args.no_record and not args.quick:
        markdown = "\n".join(
            [
                f"{utc_now()}, `python -m bench.trainer {' '.join(sys.argv[1:])}`",
                "",
                *(f"- {line}" for line in header),
                "",
                "| phase | mean ms / step | % of step |",
                "|---|---|---|",
                *(f"| {name} | {s * 1e3:.1f} | {s / wall:.2%} |" for name, s in rows),
                f"| **step (wall)** | **{wall * 1e3:.1f}** | 100% |",
                "",
                *(f"{line}." for line in summary),
            ]
        )
        write_section("Trainer step-time split (bench/trainer.py)", markdown)


if __name__ == "__main__":
    main()
