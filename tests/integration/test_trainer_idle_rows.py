"""Skipping rows whose advantage is zero everywhere must not change the update: same weights after a
real DeepSpeed step with and without the skip, fewer rows forwarded with it."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from proto.config import ExperimentConfig, GRPOAdvantage
from tests.trainer_data import generate_groups
from trainer.batching import build_batch
from trainer.engine import PolicyEngine, ReferencePolicy
from trainer.step import advantages_for, train_on

pytestmark = pytest.mark.integration
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions")
)


def config(model_dir: Path, skip: bool) -> ExperimentConfig:
    return ExperimentConfig(
        model={"path": model_dir},
        rewards=[{"name": "a", "url": "http://127.0.0.1:1"}, {"name": "b", "url": "http://127.0.0.1:1"}],
        trainer={
            "advantage": {"estimator": "gd2po_hard"},
            "skip_idle_rows": skip,
            "deepspeed": {
                "zero_optimization": {"stage": 0},
                "gradient_clipping": 0.0,  # clipping would hide a wrong loss scale
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 4,
                # plain SGD: Adam's first step is ~lr·sign(g), which turns float rounding in
                # near-zero gradients into visible weight differences
                "optimizer": {"type": "SGD", "params": {"lr": 1.0}},
            },
        },
    )


def test_skipping_idle_rows_gives_the_same_update(tiny_model_dir: Path) -> None:
    groups = generate_groups(tiny_model_dir, 3, seed=7)
    # group 0: planted conflicts (Hard drops rollouts 0 and 1); group 1: no variance at all (idle);
    # group 2: one informative reward.
    groups[1].rewards = {"a": [1.0] * 4, "b": [0.5] * 4}
    groups[2].rewards = {"a": [1.0, 0.0, 0.0, 1.0], "b": [0.0] * 4}
    results = {}
    for skip in (True, False):
        cfg = config(tiny_model_dir, skip)
        engine = PolicyEngine(cfg)
        initial = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        batch = build_batch(groups, cfg.reward_names, 0, engine.pad_id)
        advantages, _, _ = advantages_for(batch, cfg)
        record = train_on(engine, batch, advantages, cfg)
        results[skip] = (record, {n: p.detach().clone() for n, p in engine.module.named_parameters()})
    idle = int((~(advantages != 0).any(dim=1)).sum())
    assert idle == 6  # 2 dropped + 4 without variance
    assert results[True][0]["rows_trained"] == batch.size - idle
    assert results[False][0]["rows_trained"] == batch.size
    assert results[True][0]["loss"] == pytest.approx(results[False][0]["loss"], rel=1e-5, abs=1e-6)
    for name, with_skip in results[True][1].items():
        torch.testing.assert_close(with_skip, results[False][1][name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(not torch.equal(initial[n], p) for n, p in results[True][1].items()), "weights did not move"


def test_kl_and_entropy_terms_train_every_row_against_a_frozen_reference(tiny_model_dir: Path) -> None:
    groups = generate_groups(tiny_model_dir, 3, seed=7)
    groups[1].rewards = {"a": [1.0] * 4, "b": [0.5] * 4}  # idle for the PPO term, not for KL / entropy
    cfg = config(tiny_model_dir, skip=True)
    cfg.trainer.loss.kl_coef, cfg.trainer.loss.entropy_coef, cfg.trainer.ppo_epochs = 0.5, 0.01, 2
    engine = PolicyEngine(cfg)
    reference = ReferencePolicy(tiny_model_dir, "float32", engine.device, temperature=engine.temperature)
    batch = build_batch(groups, cfg.reward_names, 0, engine.pad_id)
    rows = (batch.input_ids[:4], batch.attention_mask[:4], batch.response_mask[:4])
    with torch.no_grad():
        torch.testing.assert_close(reference.token_logprobs(*rows)[0], engine.token_logprobs(*rows)[0])
    advantages, _, _ = advantages_for(batch, cfg)

    record = train_on(engine, batch, advantages, cfg, reference)

    assert record["rows_trained"] == batch.size  # the KL and entropy terms reach the idle group too
    assert record["entropy"] > 0
    assert record["kl_ref"] > 0  # the second epoch runs on moved weights; the reference stayed put
    with torch.no_grad():
        moved = engine.token_logprobs(*rows)[0]
        assert not torch.allclose(reference.token_logprobs(*rows)[0], moved)
    with pytest.raises(ValueError, match="needs a reference policy"):
        train_on(engine, batch, advantages, cfg)


def test_recomputed_old_logprobs_replace_the_behaviour_logprobs(tiny_model_dir: Path) -> None:
    groups = generate_groups(tiny_model_dir, 2, seed=3)
    cfg = config(tiny_model_dir, skip=False)
    cfg.trainer.loss.recompute_old_logprobs = True
    engine = PolicyEngine(cfg)
    batch = build_batch(groups, cfg.reward_names, 0, engine.pad_id)
    batch.old_logprobs = batch.old_logprobs - batch.response_mask  # behaviour log-probs off by one nat
    advantages, _, _ = advantages_for(batch, cfg)

    record = train_on(engine, batch, advantages, cfg)

    # One update on the unchanged policy: π / π_old is exactly 1 only if π_old was recomputed.
    assert record["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert record["clip_fraction"] == 0.0


def _ratio_everywhere(engine: PolicyEngine, batch, ratio: float) -> None:
    """Make π/π_old exactly `ratio` on every response token of the current policy."""
    with torch.no_grad():
        current = engine.token_logprobs(batch.input_ids, batch.attention_mask, batch.response_mask)[0]
    batch.old_logprobs = (current - math.log(ratio)) * batch.response_mask


@pytest.mark.parametrize("skip", [True, False])
def test_loss_statistics_average_over_the_rows_that_train(tiny_model_dir: Path, skip: bool) -> None:
    """Issue 13 item 4: GRPO, group A rewards [1,0,1,0], group B [1,1,1,1] (idle), 3 tokens each, every
    token's ratio 1.1 → ratio_mean 1.1 and approx KL exp(−w)+w−1 = 0.004401 (w = ln 1.1), whether idle
    rows are skipped or forwarded (with skipping they used to read 0.55 and 0.002201)."""
    groups = generate_groups(tiny_model_dir, 2, new_tokens=3, seed=11)
    groups[0].rewards = {"a": [1.0, 0.0, 1.0, 0.0], "b": [0.0] * 4}
    groups[1].rewards = {"a": [1.0] * 4, "b": [0.0] * 4}
    cfg = config(tiny_model_dir, skip)
    cfg.trainer.advantage = GRPOAdvantage()
    engine = PolicyEngine(cfg)
    batch = build_batch(groups, cfg.reward_names, 0, engine.pad_id)
    _ratio_everywhere(engine, batch, 1.1)
    advantages, _, _ = advantages_for(batch, cfg)

    record = train_on(engine, batch, advantages, cfg)

    w = math.log(1.1)
    assert record["rows_trained"] == (4 if skip else 8)
    assert record["ratio_mean"] == pytest.approx(1.1, abs=1e-5)
    assert record["kl"] == pytest.approx(math.exp(-w) + w - 1, abs=1e-6) == pytest.approx(0.004401, abs=1e-6)
    assert record["clip_fraction"] == 0.0  # 1.1 is inside [0.8, 1.2]


def _count_backward_calls(engine: PolicyEngine) -> list[int]:
    calls = [0]
    real = engine.engine.backward

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    engine.engine.backward = counted
    return calls


def _one_counted_step(cfg: ExperimentConfig, groups) -> tuple[PolicyEngine, dict, list[int], dict]:
    """A fresh engine's weights, then one train_on of `groups` counting DeepSpeed backward calls."""
    engine = PolicyEngine(cfg)
    initial = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    calls = _count_backward_calls(engine)
    batch = build_batch(groups, cfg.reward_names, 0, engine.pad_id)
    advantages, _, _ = advantages_for(batch, cfg)
    return engine, initial, calls, train_on(engine, batch, advantages, cfg)


def test_a_step_with_nothing_to_train_runs_no_backward_and_no_optimizer_step(tiny_model_dir: Path) -> None:
    """Issue 13 item 7: every group without variance → no backward at all (the demo spent 13.6 s on
    eight empty ones), no optimizer step: AdamW with weight decay would still have moved the weights."""
    groups = generate_groups(tiny_model_dir, 3, seed=5)
    for group in groups:
        group.rewards = {"a": [1.0] * 4, "b": [0.25] * 4}
    cfg = config(tiny_model_dir, skip=True)
    cfg.trainer.deepspeed["optimizer"] = {"type": "AdamW", "params": {"lr": 0.1, "weight_decay": 0.5}}

    engine, initial, calls, record = _one_counted_step(cfg, groups)

    assert calls[0] == 0
    assert engine.engine.global_steps == 0
    assert record["optimizer_steps"] == 0 and record["rows_trained"] == record["tokens_trained"] == 0
    assert record["grad_norm"] == 0.0 and record["loss"] == 0.0
    assert all(torch.equal(initial[n], p) for n, p in engine.module.named_parameters())


def test_a_step_runs_one_backward_per_micro_batch_it_trains(tiny_model_dir: Path) -> None:
    """One group of three trains (one micro-batch: its rows share a prompt forward): one backward, one
    optimizer step, though gradient_accumulation_steps is 4 — not four backwards, three of them empty."""
    groups = generate_groups(tiny_model_dir, 3, seed=5)
    groups[0].rewards = {"a": [1.0] * 4, "b": [0.25] * 4}
    groups[1].rewards = {"a": [1.0, 0.0, 0.0, 1.0], "b": [0.0] * 4}
    groups[2].rewards = {"a": [0.5] * 4, "b": [0.5] * 4}

    engine, initial, calls, record = _one_counted_step(config(tiny_model_dir, skip=True), groups)

    assert engine.accumulation_steps == 4
    assert calls[0] == 1 and engine.engine.global_steps == 1
    assert record["optimizer_steps"] == 1 and record["rows_trained"] == 4
    assert record["tokens_trained"] == 4 * 8  # tokens_per_second counts these, not the 12 rows' 96
    assert any(not torch.equal(initial[n], p) for n, p in engine.module.named_parameters())


@pytest.mark.parametrize("skip", [True, False])
def test_rows_without_a_response_token_train_nothing_and_break_nothing(
    tiny_model_dir: Path, skip: bool
) -> None:
    """A group whose every completion is empty (the trainer's admission rules refuse one at pull time;
    train_on must not depend on it), with an entropy term that gives every other row a gradient: the
    step runs, its statistics stay finite and the empty rows count neither as trained nor in the stats
    (was ZeroDivisionError, or DeepSpeed's "loss must be a scalar" before)."""
    groups = generate_groups(tiny_model_dir, 2, seed=9)
    for completion in groups[1].completions:
        completion.token_ids, completion.logprobs = [], []
    groups[1].rewards = {"a": [1.0, 0.0, 1.0, 0.0], "b": [0.0] * 4}
    cfg = config(tiny_model_dir, skip)
    cfg.trainer.loss.entropy_coef = 0.01
    engine = PolicyEngine(cfg)
    batch = build_batch(groups, cfg.reward_names, 0, engine.pad_id)
    advantages, _, _ = advantages_for(batch, cfg)

    record = train_on(engine, batch, advantages, cfg)

    assert record["optimizer_steps"] == 1
    assert record["rows_trained"] == 4  # the empty rows are not forwarded, whatever skip_idle_rows says
    assert all(math.isfinite(v) for v in record.values()), record
    # DeepSpeed reports no norm for plain fp32 without ZeRO (stage 0 here): the trainer measures it
    assert record["grad_norm"] > 0
    assert record["entropy"] > 0
