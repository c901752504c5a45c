"""Cold start: supervised fine-tuning of the base policy on reference answers, before RL.

A small model cannot write the tool-call format cold, so every rollout of a group scores the same and
RL has nothing to learn from (verl, OpenRLHF and prime-rl all ship an SFT stage for this). This module
trains ``model.path`` on the ``sft`` section's examples — prompt–answer pairs, the prompt rendered with
the model's chat template exactly as the rollout renders it, the loss on the answer tokens only — with
the same DeepSpeed engine and log-prob code as the RL trainer, and saves a safetensors folder the
rollout and the trainer load like any model. (TRL's SFTTrainer was the first choice; on these CPUs its
fused, vocabulary-chunked LM-head loss runs without Triton and one 4-example step of the demo's SFT took
over three minutes. The engine here evaluates the LM head on answer positions only.)

The result is cached under ``sft.output_root`` by a key over the base weights' digest, the bytes of
every training file, the ``sft`` settings and the library versions: the same cold start is trained once
per machine, and changing any of these trains a new one beside it. A folder is written to a staging
name and renamed when complete, so an interrupted run never leaves a half-written model under the key.

    python -m trainer.sft --config FILE [--report PATH]   # prints the model folder
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import blake3

from proto.config import ExperimentConfig, SFTConfig
from proto.records import get_field, read_rows
from proto.weights import weights_digest

log = logging.getLogger("trainer.sft")
INFO_FILE = "sft_info.json"


# Bump when the training recipe changes (loss, batching, optimizer use): a new key, a new model.
RECIPE_VERSION = 1
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def cache_key(config: ExperimentConfig) -> str:
    """16 hex digits over everything that changes the cold-start model: the base weights and tokenizer
    (chat template included), every training file's bytes, the ``sft`` settings, the dtype, mixed
    precision, attention kernel and weight decay the engine trains with, the library versions and :data:`RECIPE_VERSION`."""
    sft = _require(config)
    base = Path(config.model.path)
    digest = blake3.blake3()
    digest.update(weights_digest(base).encode())
    for name in _TOKENIZER_FILES:
        if (base / name).is_file():
            digest.update(name.encode())
            digest.update((base / name).read_bytes())
    for path in sft.train_files:
        digest.update(Path(path).name.encode())
        digest.update(Path(path).read_bytes())
    settings = sft.model_dump(mode="json", exclude={"output_root", "train_files"})
    settings |= {
        "dtype": config.model.dtype,
        "weight_decay": config.trainer.weight_decay,
        "torch_autocast": _mixed_precision(config),
        "attn_implementation": config.model.attn_implementation,
        "recipe": RECIPE_VERSION,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for package in ("torch", "transformers", "deepspeed"):
        digest.update(f"{package}=={version(package)}".encode())
    return digest.hexdigest()[:16]


def output_dir(config: ExperimentConfig, key: str | None = None) -> Path:
    """Where the cold-start model for this config lives (whether or not it exists yet); ``key`` is
    :func:`cache_key` when the caller already has it (it reads the base weights and the data)."""
    sft = _require(config)
    return Path(sft.output_root) / f"{Path(config.model.path).name}-sft-{key or cache_key(config)}"


def is_complete(folder: Path) -> bool:
    return (folder / INFO_FILE).is_file() and any(folder.glob("*.safetensors"))


def _require(config: ExperimentConfig) -> SFTConfig:
    if config.sft is None:
        raise ValueError("the config has no sft section")
    return config.sft


def _messages(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def load_examples(config: ExperimentConfig, tokenizer: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Prompt–completion examples as chat messages, shuffled with ``sft.seed``; those whose
    chat-templated prompt + answer exceed ``sft.max_tokens`` are dropped (counted), then the first
    ``sft.max_examples`` are kept. Returns (examples, counts)."""
    import numpy as np

    sft = _require(config)
    rows: list[dict[str, Any]] = [row for path in sft.train_files for row in read_rows(path)]
    order = np.random.default_rng(sft.seed).permutation(len(rows))
    examples, too_long = [], 0
    for index in order:
        row = rows[int(index)]
        prompt = _messages(get_field(row, sft.prompt_field))
        answer = str(get_field(row, sft.completion_field))
        rendered = tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": answer}], tokenize=False
        )
        if len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) > sft.max_tokens:
            too_long += 1
            continue
        examples.append({"prompt": prompt, "completion": [{"role": "assistant", "content": answer}]})
        if sft.max_examples is not None and len(examples) == sft.max_examples:
            break
    if not examples:
        raise ValueError(f"no SFT example fits sft.max_tokens={sft.max_tokens} in {sft.train_files}")
    return examples, {"rows": len(rows), "too_long": too_long, "used": len(examples)}


def _tokenize(example: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the prompt chat-templated with the generation prompt, exactly as the
    rollout renders it, and the answer followed by the end-of-turn token the rollout stops on."""
    prompt = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=False)
    answer = example["completion"][0]["content"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, answer_ids


def _mixed_precision(config: ExperimentConfig) -> dict[str, Any] | None:
    """The RL trainer's ``torch_autocast`` section (None without one): SFT computes the way RL will."""
    section = config.trainer.deepspeed.get("torch_autocast")
    return dict(section) if section else None


def _sft_engine_config(config: ExperimentConfig) -> ExperimentConfig:
    """The experiment as the DeepSpeed engine sees it for SFT: one example per micro-batch (no padding),
    ``sft.batch_size`` of them accumulated per optimizer step, ZeRO-0, AdamW at ``sft.lr``, and the RL
    trainer's mixed precision (``torch_autocast``) when it has one."""
    sft = _require(config)
    deepspeed: dict[str, Any] = {
        "zero_optimization": {"stage": 0},
        "gradient_clipping": 1.0,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": sft.batch_size,
    }
    if (section := _mixed_precision(config)) is not None:
        deepspeed["torch_autocast"] = section
    # The cold start trains every weight and saves a full model folder: trainer.lora applies to RL only.
    trainer = config.trainer.model_copy(update={"lr": sft.lr, "deepspeed": deepspeed, "lora": None})
    # SFT fits the model's own distribution: log-probs at temperature 1, whatever the rollout samples at.
    rollout = config.rollout.model_copy(update={"temperature": 1.0})
    return config.model_copy(update={"trainer": trainer, "rollout": rollout})


def run_sft(config: ExperimentConfig) -> tuple[Path, bool]:
    """Train (or find in the cache) the cold-start model; returns (folder, was_cached).

    Loss: mean negative log-likelihood of the answer tokens of each example (the prompt is context only),
    averaged over the ``sft.batch_size`` examples of an optimizer step."""
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from trainer.engine import PolicyEngine

    sft = _require(config)
    key = cache_key(config)
    target = output_dir(config, key)
    if is_complete(target):
        log.info("cold start cached: %s", target)
        return target, True
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    examples, counts = load_examples(config, tokenizer)
    passes = max(1, round(sft.epochs * len(examples)))
    steps = -(-passes // sft.batch_size)  # every example of an epoch is seen: the last step wraps around
    log.info(
        "SFT on %d examples (%d rows, %d longer than %d tokens left out): %d optimizer steps of %d, lr %g",
        counts["used"],
        counts["rows"],
        counts["too_long"],
        sft.max_tokens,
        steps,
        sft.batch_size,
        sft.lr,
    )
    torch.manual_seed(sft.seed)
    engine = PolicyEngine(_sft_engine_config(config))  # in training mode, as for RL
    losses: list[float] = []
    for step in tqdm(range(steps), desc="sft", unit="step", mininterval=1.0):
        total = 0.0
        for micro in range(sft.batch_size):
            prompt_ids, answer_ids = _tokenize(
                examples[(step * sft.batch_size + micro) % len(examples)], tokenizer
            )
            ids = torch.tensor([prompt_ids + answer_ids])
            mask = torch.zeros((1, ids.shape[1] - 1))
            mask[0, len(prompt_ids) - 1 :] = 1.0  # targets: every answer token, end-of-turn included
            logprobs, _ = engine.token_logprobs(ids, torch.ones_like(ids), mask)
            loss = -(logprobs * mask).sum() / mask.sum()
            engine.backward(loss, last=micro == sft.batch_size - 1)
            engine.step()  # the optimizer steps after the batch's last micro-batch only
            total += loss.item() / sft.batch_size
        losses.append(total)
    # A staging folder of this process only; a complete target written meanwhile by another run wins.
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    engine.module.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    info = {
        "key": key,
        "base_model": str(config.model.path),
        "train_files": [str(p) for p in sft.train_files],
        "settings": sft.model_dump(mode="json", exclude={"output_root", "train_files"}),
        "examples": counts,
        "optimizer_steps": steps,
        "loss_per_step": [round(v, 4) for v in losses],
        "seconds": round(time.time() - started, 1),
    }
    (staging / INFO_FILE).write_text(json.dumps(info, indent=2))
    if is_complete(target):
        shutil.rmtree(staging)
        log.info("another run finished the same cold start first: %s", target)
        return target, True
    shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover (no info file)
    staging.rename(target)
    log.info(
        "cold start saved: %s (%d steps, loss %.3f → %.3f, %.0f s)",
        target,
        steps,
        losses[0],
        losses[-1],
        info["seconds"],
    )
    return target, False


def main() -> None:
    import typer

    app = typer.Typer(add_completion=False)

    @app.command()
    def sft(
        config: Path = typer.Option(
            ..., exists=True, dir_okay=False, help="Experiment YAML with an sft section."
        ),
        report: Path | None = typer.Option(None, help="Also write {model_path, cached} as JSON here."),
    ) -> None:
        """Train the cold-start model of the config (or find it in the cache) and print its folder."""
        from proto.config import ConfigError, load_config

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            loaded = load_config(config)
            folder, cached = run_sft(loaded)
        except (ConfigError, ValueError, KeyError, FileNotFoundError) as exc:
            typer.secho(f"sft: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps({"model_path": str(folder.resolve()), "cached": cached}))
        typer.echo(folder.resolve())

    app()


if __name__ == "__main__":
    main()
