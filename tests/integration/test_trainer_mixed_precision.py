"""bf16 mixed precision in the trainer (DeepSpeed's ``torch_autocast``): fp32 weights and gradients, bf16
matmuls in the forward, the same precision for the frozen reference, and a cold start keyed by it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from proto.config import ExperimentConfig, SFTConfig
from tests.trainer_data import generate_groups
from trainer.batching import build_batch
from trainer.engine import PolicyEngine, ReferencePolicy, autocast_dtype
from trainer.sft import cache_key

pytestmark = pytest.mark.integration
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions")
)
AUTOCAST = {"enabled": True, "dtype": "bfloat16"}


def config(model_dir: Path, *, autocast: bool, attn: str | None = None) -> ExperimentConfig:
    deepspeed = {
        "zero_optimization": {"stage": 0},
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
    }
    if autocast:
        deepspeed["torch_autocast"] = AUTOCAST
    return ExperimentConfig(
        model={"path": model_dir, "attn_implementation": attn},
        rewards=[{"name": "a", "url": "http://127.0.0.1:1"}],
        trainer={"deepspeed": deepspeed},
    )


def _scored_rows(model_dir: Path):
    group = generate_groups(model_dir, 1, seed=5)[0]
    group.rewards = {"a": [1.0, 0.0, 1.0, 0.0]}
    return group


def test_autocast_dtype_reads_the_deepspeed_section() -> None:
    assert autocast_dtype({}) is None
    assert autocast_dtype({"torch_autocast": {"enabled": False, "dtype": "bfloat16"}}) is None
    assert autocast_dtype({"torch_autocast": AUTOCAST}) is torch.bfloat16
    assert autocast_dtype({"torch_autocast": {"enabled": True}}) is torch.bfloat16  # DeepSpeed's default
    with pytest.raises(ValueError, match="torch_autocast.dtype: unknown dtype 'bf17'"):
        autocast_dtype({"torch_autocast": {"enabled": True, "dtype": "bf17"}})


@pytest.mark.parametrize("attn", [None, "eager"])
def test_the_forward_runs_in_bf16_and_the_weights_stay_fp32(tiny_model_dir: Path, attn: str | None) -> None:
    group = _scored_rows(tiny_model_dir)
    scores = {}
    for autocast in (False, True):
        cfg = config(tiny_model_dir, autocast=autocast, attn=attn)
        engine = PolicyEngine(cfg)
        batch = build_batch([group], cfg.reward_names, 0, engine.pad_id)
        rows = (batch.input_ids, batch.attention_mask, batch.response_mask)
        logprobs, _ = engine.token_logprobs(*rows)
        scores[autocast] = logprobs.detach()
        loss = -(logprobs * batch.response_mask).sum() / batch.response_mask.sum()
        engine.backward(loss, last=True)
        for name, param in engine.module.named_parameters():
            assert param.dtype == torch.float32, name
            assert param.grad is None or param.grad.dtype == torch.float32, name
        engine.step()
    mask = batch.response_mask.bool()
    difference = (scores[True] - scores[False])[mask].abs()
    # bf16 rounding moves the log-probs a little (an autocast DeepSpeed ignored would move them not at all)
    assert 0 < difference.max() < 0.25
    assert difference.mean() < 0.05


def test_the_reference_scores_with_the_policys_precision(tiny_model_dir: Path) -> None:
    cfg = config(tiny_model_dir, autocast=True)
    engine = PolicyEngine(cfg)
    assert engine.autocast_dtype is torch.bfloat16
    batch = build_batch([_scored_rows(tiny_model_dir)], cfg.reward_names, 0, engine.pad_id)
    rows = (batch.input_ids, batch.attention_mask, batch.response_mask)
    with torch.no_grad():
        policy = engine.token_logprobs(*rows)[0]
    same = ReferencePolicy(tiny_model_dir, "float32", engine.device, temperature=1.0, autocast=torch.bfloat16)
    fp32 = ReferencePolicy(tiny_model_dir, "float32", engine.device, temperature=1.0)
    mask = batch.response_mask.bool()
    # the reference is the starting policy: with the policy's precision the KL to it starts at exactly 0
    torch.testing.assert_close(same.token_logprobs(*rows)[0][mask], policy[mask], rtol=0, atol=1e-6)
    assert not torch.allclose(fp32.token_logprobs(*rows)[0][mask], policy[mask], rtol=0, atol=1e-6)


def test_the_cold_start_is_keyed_by_the_trainers_precision_and_attention(tiny_model_dir: Path) -> None:
    def key(autocast: bool, attn: str | None) -> str:
        cfg = config(tiny_model_dir, autocast=autocast, attn=attn)
        cfg.sft = SFTConfig(train_files=[Path(__file__)])  # any bytes: only the key is computed
        return cache_key(cfg)

    keys = {key(a, b) for a in (False, True) for b in (None, "eager")}
    assert len(keys) == 4
