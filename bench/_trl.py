"""TRL's GRPOTrainer on a gd2po job: the peer a user would pick instead, configured from the same config.

Both comparisons with TRL use it — bench/pipeline.py (time per step) and bench/versus_trl.py (learning
over samples and wall time). It runs in its own process (``python -m bench._trl CONFIG STEPS OUT
[--aggregation ...]``, started by :func:`start`) so TRL's imports, threads and memory never share the
bench's interpreter, and appends to OUT one JSON line per generation batch — ``{"step", "time",
"rewards": {name: mean}, "reward": weighted sum}`` — and a last line of prompt facts.

What is matched, and how (gd2po config → GRPOConfig):

* model: ``model.path``, loaded in fp32 (gd2po's trainer keeps fp32 master weights too); bf16 mixed
  precision (``bf16``: torch autocast through accelerate) when the trainer's DeepSpeed config enables
  ``torch_autocast`` with bfloat16, as the CPU demo does; no reference model unless
  ``trainer.loss.kl_coef`` > 0 (→ ``beta``);
* prompts: the rollout's own :class:`rollout_service.prompts.PromptSource` with ``data.shuffle_seed``
  takes the prompts gd2po's rollout takes, in its order, chat-templated by TRL as by vLLM;
* rewards: the same scorers (reward_service.scorers.build_scorer) in process, weighted by ``weight``;
  a reward that fails is None (TRL excludes it), never 0;
* batch: ``prompts_per_step × group_size`` completions per generation, ``trainer.mini_batches``
  optimizer steps on each (``steps_per_generation``), DeepSpeed's micro batch × accumulation per
  optimizer step; ``max_steps`` counts optimizer steps, so gd2po's N steps are N × mini_batches here;
* sampling and update: temperature, top_p, max completion tokens, lr (constant), weight decay,
  clip ε low/high, gradient clipping; loss ``token-mean`` ↔ TRL ``dapo`` (normalised by the batch's
  tokens), ``seq-mean-token-mean`` ↔ ``grpo``.

Prompts over ``model.max_prompt_tokens`` are dropped as the rollout drops them under
``data.overlong_prompts: filter``; under ``truncate_left`` TRL (no prompt-length cap) gets them whole and
the line of prompt facts counts them. Not matched: TRL has no dual clip (inactive at one optimizer step
per batch: the ratio is 1); TRL generates with transformers ``generate`` in the training process (``use_vllm`` needs a GPU server).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from proto.config import load_config

AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")  # TRL's GRPO and its GDPO
LOSS_TYPES = {"token-mean": "dapo", "seq-mean-token-mean": "grpo"}


def worker(config_path: Path, steps: int, out: Path, *, aggregation: str = "sum_then_normalize") -> None:
    """Train ``steps`` gd2po-equivalent steps with GRPOTrainer; one JSON line per generation batch to
    ``out``. Raises ValueError for a config TRL cannot match (batch arithmetic, loss aggregation,
    entropy bonus)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from proto import ScoreItem
    from reward_service.scorers import build_scorer
    from rollout_service.prompts import PromptSource

    config = load_config(config_path)
    trainer, ds = config.trainer, config.trainer.deepspeed
    micro, accumulation = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    autocast = ds.get("torch_autocast", {})
    group, per_step = config.rollout.group_size, trainer.prompts_per_step * config.rollout.group_size
    if micro * accumulation * trainer.mini_batches != per_step:
        raise ValueError(
            f"micro batch {micro} × accumulation {accumulation} × mini_batches {trainer.mini_batches} must "
            f"equal prompts_per_step × group_size = {per_step} for TRL to train the same batches"
        )
    if trainer.loss.agg not in LOSS_TYPES:
        raise ValueError(
            f"trainer.loss.agg {trainer.loss.agg!r} has no TRL loss_type; use {sorted(LOSS_TYPES)}"
        )
    if trainer.loss.entropy_coef:
        raise ValueError("trainer.loss.entropy_coef: TRL's GRPOTrainer has no entropy bonus")
    source = PromptSource(
        config.data.train_files,
        prompt_field=config.data.prompt_field,
        label_field=config.data.label_field,
        seed=config.data.shuffle_seed,
    )
    tokenizer = AutoTokenizer.from_pretrained(config.model.path)

    def prompt_tokens(records) -> list[int]:  # as the rollout engine counts them: chat template, untruncated
        texts = [
            tokenizer.apply_chat_template(
                [m.model_dump() for m in r.messages], add_generation_prompt=True, tokenize=False
            )
            for r in records
        ]
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []

    if config.data.overlong_prompts == "filter":  # the rollout drops them before its first prompt
        source.limit_length(prompt_tokens, config.model.max_prompt_tokens, "filter")
    records = source.take(steps * trainer.prompts_per_step)
    prompts = [[{"role": m.role, "content": m.content} for m in r.messages] for r in records]
    dataset = Dataset.from_list(
        [{"prompt": p, "label": r.label} for p, r in zip(prompts, records, strict=True)]
    )
    tokens = prompt_tokens(records)

    def reward_func(reward):
        scorer = build_scorer(reward.launch.scorer, reward.launch.options)

        def score(prompts, completions, label, **_):
            items = [
                ScoreItem(id=str(i), prompt=p, completion=c[0]["content"], label=y)
                for i, (p, c, y) in enumerate(zip(prompts, completions, label, strict=True))
            ]
            return [None if isinstance(s, Exception) else float(s) for s in scorer.score(items)]

        score.__name__ = reward.name
        return score

    names = [r.name for r in config.rewards]

    class StepLog(TrainerCallback):
        """TRL logs reward means once per generation batch (``logging_steps=1``); one line each."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or f"rewards/{names[0]}/mean" not in logs:
                return
            line = {
                "step": state.global_step,
                "time": time.time(),
                "rewards": {n: logs[f"rewards/{n}/mean"] for n in names},
                "reward": logs.get("reward"),
            }
            with out.open("a") as handle:
                handle.write(json.dumps(line) + "\n")

    args = GRPOConfig(
        output_dir=str(out.parent / f"{out.stem}-trl-output"),
        max_steps=steps * trainer.mini_batches,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation * trainer.mini_batches,
        num_generations=group,
        max_completion_length=config.model.max_response_tokens,
        temperature=config.rollout.temperature,
        top_p=config.rollout.top_p,
        learning_rate=trainer.lr,
        lr_scheduler_type="constant",  # gd2po configures no schedule
        weight_decay=trainer.weight_decay,
        epsilon=trainer.loss.clip_low,
        epsilon_high=trainer.loss.clip_high,
        loss_type=LOSS_TYPES[trainer.loss.agg],
        multi_objective_aggregation=aggregation,
        max_grad_norm=ds.get("gradient_clipping", 1.0),
        beta=trainer.loss.kl_coef,
        reward_weights=[r.weight for r in config.rewards],
        shuffle_dataset=False,
        seed=config.run.seed,
        use_cpu=True,
        bf16=autocast.get("enabled", False) and autocast.get("dtype") in ("bfloat16", "torch.bfloat16"),
        gradient_checkpointing=trainer.gradient_checkpointing,
        use_vllm=False,
        model_init_kwargs={"dtype": torch.float32},
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    GRPOTrainer(
        model=str(config.model.path),
        reward_funcs=[reward_func(r) for r in config.rewards],
        args=args,
        train_dataset=dataset,
        callbacks=[StepLog()],
    ).train()
    with out.open("a") as handle:
        over = sum(n > config.model.max_prompt_tokens for n in tokens)
        info = {"prompts": len(tokens), "prompt_tokens": sum(tokens), "prompts_over_limit": over}
        handle.write(json.dumps(info) + "\n")


def start(
    config: Path,
    steps: int,
    out: Path,
    log: Path,
    env: dict[str, str],
    *,
    aggregation: str = "sum_then_normalize",
) -> subprocess.Popen:
    """Start :func:`worker` as ``python -m bench._trl`` (stdout and stderr to ``log``); ``out`` is emptied."""
    out.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "bench._trl",
        str(config),
        str(steps),
        str(out),
        "--aggregation",
        aggregation,
    ]
    with log.open("wb") as handle:
        return subprocess.Popen(
            command,
            cwd=Path(__file__).resolve().parents[1],
            env={**os.environ, **env},
            stdout=handle,
            stderr=subprocess.STDOUT,
        )


def read(out: Path) -> tuple[list[dict], dict]:
    """(per-step lines, prompt facts) of a finished worker's ``out``."""
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    return [line for line in lines if "time" in line], next((line for line in lines if "prompts" in line), {})


def main() -> None:
    parser = argparse.ArgumentParser(description="GRPOTrainer on a gd2po config (bench helper).")
    parser.add_argument("config", type=Path)
    parser.add_argument("steps", type=int, help="gd2po steps (generation batches) to train")
    parser.add_argument("out", type=Path)
    parser.add_argument("--aggregation", choices=AGGREGATIONS, default="sum_then_normalize")
    args = parser.parse_args()
    worker(args.config, args.steps, args.out, aggregation=args.aggregation)


if __name__ == "__main__":
    main()
