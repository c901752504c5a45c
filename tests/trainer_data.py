"""ScoredGroups made from a real model's own sampled generations (transformers), for trainer tests."""

from __future__ import annotations

import time
from pathlib import Path

import redis
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from proto import Completion, ScoredGroup, encode
from proto.config import ExperimentConfig
from proto.keys import RedisKeys
from proto.stream import entry_fields

PROMPTS = ["What is the capital of France?", "Name a prime number.", "Say hello.", "Count to three.", "Why?"]
# Two rewards that disagree on rollouts 0 and 1 of every group: conflict ratio 0.5 by construction.
PLANTED = {"a": [1.0, 0.0, 1.0, 0.0], "b": [0.0, 1.0, 1.0, 0.0]}


def generate_groups(model_dir: Path, count: int, *, group_size: int = 4, new_tokens: int = 8, seed: int = 0):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    groups = []
    for index in range(count):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        prompt = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(
                prompt.repeat(group_size, 1),
                do_sample=True,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=tokenizer.eos_token_id,
            )
        sampled = out.sequences[:, prompt.shape[1] :]
        logprobs = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).gather(-1, sampled[..., None])[
            ..., 0
        ]
        completions = [
            Completion(
                token_ids=sampled[i].tolist(),
                logprobs=logprobs[i].tolist(),
                text=tokenizer.decode(sampled[i]),
                finish_reason="length",
            )
            for i in range(group_size)
        ]
        groups.append(
            ScoredGroup(
                group_id=f"g{seed}-{index}",
                prompt_id=f"p{index}",
                prompt_token_ids=prompt[0].tolist(),
                completions=completions,
                rewards={k: v[:group_size] for k, v in PLANTED.items()},
                policy_version=0,
                created_at=time.time(),
                scored_at=time.time(),
                producer_id="test",
            )
        )
    return groups


def push(redis_url: str, groups: list[ScoredGroup], keys: RedisKeys = RedisKeys()) -> None:
    client = redis.Redis.from_url(redis_url)
    for group in groups:
        client.xadd(keys.groups, entry_fields(encode(group)))
    client.incrby(keys.produced, len(groups))
    client.close()


def trainer_experiment(tmp_path: Path, model_dir: Path, redis_url: str, trainer: dict) -> ExperimentConfig:
    """A trainer experiment on `model_dir` and a real Redis: rewards "a" and "b" (their services are never
    called: groups arrive already scored), the run folder under `tmp_path`, `trainer` as the section."""
    return ExperimentConfig(
        run={"output_dir": tmp_path / "run"},
        redis={"url": redis_url},
        model={"path": model_dir},
        rewards=[{"name": "a", "url": "http://127.0.0.1:1"}, {"name": "b", "url": "http://127.0.0.1:1"}],
        trainer=trainer,
    )
