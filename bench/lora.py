"""What LoRA (``trainer.lora``) saves the trainer against full fine-tuning: ``python -m bench.lora [--repeats 3]``.

One demo-sized group — a 550-token prompt and 4 answers of 70 tokens, the prompt forwarded once — through
the real ``PolicyEngine`` (DeepSpeed ZeRO-2, AdamW, fp32) of the demo's model on one pinned core, in two
arms, each in its own process so that its peak resident memory (``ru_maxrss``) is its own: full
fine-tuning, and rank-16 adapters on every attention and MLP projection (``trainer.lora``'s defaults).
Per arm: median forward + backward + optimizer step after one warm-up, peak RSS, trainable parameters,
optimizer-state bytes (Adam's moments and ZeRO's fp32 partition), checkpoint bytes
(``trainer.checkpoint.save``) and the time to build the published state (for LoRA the merged W + ΔW).
Results go to the "LoRA" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench._common import (
    DEMO_GROUP_SHAPE,
    REPO,
    demo_shaped_group,
    load,
    machine,
    ratio_table,
    run_arm,
    utc_now,
    versions,
    write_section,
)

DEMO = REPO / "configs" / "tool_calling_smollm2_cpu.yaml"
PROMPT, ANSWER, GROUP = DEMO_GROUP_SHAPE
ARMS = ("full", "lora")


def _tensor_bytes(value: object) -> int:
    """Bytes of every tensor inside a (nested) optimizer state."""
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def measure(arm: str, model: Path, repeats: int) -> dict[str, float]:
    """One arm in this process (pinned to one core): its figures."""
    from proto.config import LoraConfig, load_config
    from trainer import checkpoint
    from trainer.engine import PolicyEngine
    from trainer.publisher import full_state_dict

    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # one core, as the demo's trainer has
    torch.set_num_threads(1)
    config = load_config(DEMO)
    config.model.path = model
    config.trainer.lora = LoraConfig() if arm == "lora" else None
    config.trainer.deepspeed = {
        "zero_optimization": {"stage": 2},
        "gradient_clipping": 1.0,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
    }
    engine = PolicyEngine(config)
    rows = demo_shaped_group(engine.module.config.vocab_size)
    times = []
    for repeat in range(repeats + 1):
        started = time.perf_counter()
        scores, _ = engine.token_logprobs(*rows, share_prompt=True)
        loss = -(scores * rows[2]).sum() / rows[2].sum()
        engine.backward(loss, last=True)
        engine.step()
        if repeat:  # the first one warms up allocators and kernels
            times.append(time.perf_counter() - started)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    optimizer_bytes = _tensor_bytes(inner.state) + _tensor_bytes(
        getattr(engine.optimizer, "single_partition_of_fp32_groups", [])  # ZeRO-1/2's fp32 master copy
    )
    started = time.perf_counter()
    full_state_dict(engine.module, engine.zero_stage)
    publish_state_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        checkpoint.save(engine, Path(folder), checkpoint.TrainerState(step=1))
        checkpoint_bytes = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    return {
        "step_s": statistics.median(times),
        "peak_rss_gib": peak_rss / 2**30,
        "trainable": sum(p.numel() for p in engine.module.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in engine.module.parameters()),
        "optimizer_mib": optimizer_bytes / 2**20,
        "checkpoint_mib": checkpoint_bytes / 2**20,
        "publish_state_s": publish_state_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", type=Path, default=REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args()
    if args.arm:
        print("RESULT=" + json.dumps(measure(args.arm, args.model, args.repeats)), flush=True)
        return

    where, load_before = machine(), load()
    figures = {}
    for arm in ARMS:
        figures[arm] = run_arm("bench.lora", arm, "--model", str(args.model), "--repeats", str(args.repeats))
        print(arm, figures[arm], flush=True)

    full, lora = figures["full"], figures["lora"]
    lines = [
        f"`python -m bench.lora --repeats {args.repeats}` · {utc_now()} · {where}",
        "",
        versions("torch", "deepspeed", "transformers", "peft"),
        f"model: {args.model.name}; one group = {PROMPT}-token prompt (forwarded once) + {GROUP} × {ANSWER}"
        f"-token answers; forward + backward + AdamW step (ZeRO-2, fp32) on one pinned core, each arm in its "
        f"own process; LoRA = `trainer.lora` defaults (r 16, alpha 32, q/k/v/o/gate/up/down projections); "
        f"load (1, 5, 15 min) before: {load_before}, after: {load()}",
        "",
    ]
    rows = [
        ("trainable parameters", "trainable", "{:,.0f}"),
        ("s per group (median)", "step_s", "{:.2f}"),
        ("peak RSS (GiB)", "peak_rss_gib", "{:.2f}"),
        ("optimizer state (MiB)", "optimizer_mib", "{:.1f}"),
        ("checkpoint (MiB)", "checkpoint_mib", "{:.1f}"),
        ("published state built in (s)", "publish_state_s", "{:.3f}"),
    ]
    lines += ratio_table(("full", "LoRA"), (full, lora), rows)
    lines += [
        "",
        "The full arm's published state is its parameters themselves (no copy below ZeRO-3); the LoRA arm's "
        "computes W + ΔW for every adapted matrix (trainer/lora.py, merged_state_dict). Peak RSS is mostly "
        "the forward's activations and logits, which LoRA does not shrink.",
    ]
    write_section("LoRA (bench/lora.py)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
