"""What bf16 mixed precision buys the trainer on this CPU: ``python -m bench.precision [--repeats 3]``.

One demo-sized group — a 550-token prompt and 4 answers of 70 tokens, the prompt forwarded once
(``trainer.share_prompt_forward``) — through the real ``PolicyEngine`` (DeepSpeed ZeRO-2, AdamW) of the
demo's model on one pinned core: forward, backward and optimizer step, timed per repetition after one
warm-up. Four arms: fp32 or DeepSpeed's ``torch_autocast`` (bf16 matmuls, fp32 weights), each with the
library's default attention (sdpa) and with ``model.attn_implementation: eager``. Also the mean and max
|Δ log p| of the autocast forward against fp32 on the same tokens: the trainer–sampler mismatch the
demo's fp32 vLLM sees. Results go to the "Trainer mixed precision" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from bench._common import (
    DEMO_GROUP_SHAPE,
    REPO,
    demo_shaped_group,
    load,
    machine,
    utc_now,
    versions,
    write_section,
)
from proto.config import load_config
from trainer.engine import PolicyEngine

DEMO = REPO / "configs" / "tool_calling_smollm2_cpu.yaml"
PROMPT, ANSWER, GROUP = DEMO_GROUP_SHAPE
ARMS = [("fp32", None), ("fp32", "eager"), ("bf16 autocast", None), ("bf16 autocast", "eager")]


def _engine(model: Path, autocast: bool, attn: str | None) -> PolicyEngine:
    config = load_config(DEMO)
    config.model.path = model
    config.model.attn_implementation = attn
    deepspeed = {
        "zero_optimization": {"stage": 2},
        "gradient_clipping": 1.0,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
    }
    if autocast:
        deepspeed["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    config.trainer.deepspeed = deepspeed
    return PolicyEngine(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", type=Path, default=REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
    args = parser.parse_args()
    where = machine()  # before pinning, which would make it report one core
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # one core, as the demo's trainer has
    torch.set_num_threads(1)

    seconds: dict[tuple[str, str | None], list[float]] = {}
    logprobs: dict[str, torch.Tensor] = {}
    for precision, attn in ARMS:
        engine = _engine(args.model, precision != "fp32", attn)
        rows = demo_shaped_group(engine.module.config.vocab_size)
        times = []
        for repeat in range(args.repeats + 1):
            started = time.perf_counter()
            scores, _ = engine.token_logprobs(*rows, share_prompt=True)
            loss = -(scores * rows[2]).sum() / rows[2].sum()
            engine.backward(loss, last=True)
            engine.step()
            if repeat:  # the first one warms up allocators and kernels
                times.append(time.perf_counter() - started)
            else:
                logprobs[precision] = scores.detach()  # before any step: the same weights in every arm
        seconds[(precision, attn)] = times
        print(f"{precision:14} {attn or 'sdpa':6} {statistics.median(times):.2f} s", flush=True)

    base = statistics.median(seconds[("fp32", None)])
    lines = [
        f"`python -m bench.precision --repeats {args.repeats}` · {utc_now()} · {where}",
        "",
        versions("torch", "deepspeed", "transformers"),
        f"model: {args.model.name}; one group = {PROMPT}-token prompt (forwarded once) + {GROUP} × {ANSWER}"
        f"-token answers; forward + backward + AdamW step on one pinned core; load before: {load()}",
        "",
        "| precision | attention | s per group (median) | vs fp32 sdpa |",
        "|---|---|---|---|",
    ]
    for (precision, attn), times in seconds.items():
        median = statistics.median(times)
        lines.append(f"| {precision} | {attn or 'sdpa (default)'} | {median:.2f} | {base / median:.2f}× |")
    mask = demo_shaped_group(1)[2].bool()
    delta = (logprobs["bf16 autocast"] - logprobs["fp32"])[mask].abs()
    lines += [
        "",
        f"Autocast vs fp32 log-probs on the same answer tokens: mean |Δ log p| {delta.mean():.4f}, "
        f"max {delta.max():.4f} (random tokens; on real demo answers it is ≈ 0.02 mean).",
    ]
    write_section("Trainer mixed precision (bench/precision.py)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
