"""One training step: rewards → advantages (GRPO / GDPO / GD²PO) → PPO-clip over mini-batches and
epochs → DeepSpeed backward/step. Micro-batch losses are weighted so the configured aggregation
(token-mean by default) is over the whole mini-batch, as if it were one batch."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from proto.config import ExperimentConfig
from trainer.algorithms import compute_advantages
from trainer.batching import TrainBatch
from trainer.engine import PolicyEngine, ReferencePolicy
from trainer.loss import policy_loss


def advantages_for(batch: TrainBatch, config: ExperimentConfig) -> tuple[torch.Tensor, dict[str, float]]:
    trainer = config.trainer
    return compute_advantages(
        trainer.estimator,
        batch.rewards,
        batch.group_index,
        batch.response_mask,
        tau=trainer.tau,
        norm_by_std=trainer.norm_by_std,
        whiten=trainer.whiten,
        weights=[r.weight for r in config.rewards],
        keep_rule=trainer.keep_rule,
        reweight=trainer.reweight,
        filter=trainer.filter,
        reward_names=config.reward_names,
    )


def group_keep_ratios(advantages: torch.Tensor, batch: TrainBatch) -> list[float]:
    """Per-group fraction of rollouts that train (a dropped rollout has an all-zero advantage row)."""
    trains = (advantages != 0).any(dim=1).to(torch.float64)
    groups = int(batch.group_index.max()) + 1
    kept = torch.zeros(groups, dtype=torch.float64).index_add_(0, batch.group_index, trains)
    sizes = torch.bincount(batch.group_index, minlength=groups).to(torch.float64)
    return (kept / sizes).tolist()


def _micro_batches(
    rows: torch.Tensor, count: int, group_index: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """``rows`` in at most ``count`` micro-batches. With ``group_index`` a group's rows stay together, in
    group order, so their shared prompt is forwarded once (``trainer.share_prompt_forward``)."""
    if group_index is None:
        return [chunk for chunk in torch.tensor_split(rows, count) if chunk.numel()]
    groups = group_index[rows]
    order = torch.argsort(groups, stable=True)
    rows, groups = rows[order], groups[order]
    parts = torch.tensor_split(torch.unique_consecutive(groups), count)
    return [rows[torch.isin(groups, part)] for part in parts if part.numel()]


def _policy_logprobs(
    engine: PolicyEngine, batch: TrainBatch, rows: torch.Tensor, *, entropy: bool, by_group: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Current log-probs (and entropies) of ``rows``, [len(rows), L−1]; ``by_group`` forwards each group's
    rows together (rows must then be in group order, as ``_micro_batches`` gives them)."""
    if not by_group:
        return engine.token_logprobs(
            batch.input_ids[rows], batch.attention_mask[rows], batch.response_mask[rows], entropy=entropy
        )
    parts = [
        engine.token_logprobs(
            batch.input_ids[members],
            batch.attention_mask[members],
            batch.response_mask[members],
            entropy=entropy,
            share_prompt=True,
        )
        for members in torch.split(
            rows, torch.unique_consecutive(batch.group_index[rows], return_counts=True)[1].tolist()
        )
    ]
    logprobs = torch.cat([p[0] for p in parts])
    return logprobs, torch.cat([p[1] for p in parts]) if entropy else None


def _weight(batch: TrainBatch, rows: torch.Tensor, total: float, agg: str) -> float:
    """This micro-batch's share of the mini-batch's aggregation denominator."""
    mask = batch.response_mask[rows]
    part = float(mask.sum()) if agg == "token-mean" else float((mask.sum(dim=1) > 0).sum())
    return part / total if total > 0 else 0.0


def _frozen_logprobs(
    policy: PolicyEngine | ReferencePolicy, batch: TrainBatch, rows_per_forward: int
) -> torch.Tensor:
    """[N, L−1] log-probs on response targets, without gradients, a micro-batch of rows per forward."""
    with torch.no_grad():
        parts = [
            policy.token_logprobs(
                batch.input_ids[rows], batch.attention_mask[rows], batch.response_mask[rows]
            )[0]
            for rows in torch.arange(batch.size).split(rows_per_forward)
        ]
    return torch.cat(parts) * batch.response_mask


def train_on(
    engine: PolicyEngine,
    batch: TrainBatch,
    advantages: torch.Tensor,
    config: ExperimentConfig,
    reference: ReferencePolicy | None = None,
) -> dict[str, float]:
    """PPO epochs × mini-batches, each one optimizer step; returns loss stats and phase times.

    Loss statistics average over the rows that train (idle rows are skipped, see ``skip_idle_rows``,
    unless a KL or entropy term gives them a gradient); ``rows_trained`` is the mean number of rows
    forwarded per optimizer step."""
    trainer = config.trainer
    if trainer.kl_coef and reference is None:
        raise ValueError("trainer.kl_coef > 0 needs a reference policy")
    # The engine's shard in one forward: under ZeRO-3 every rank must run as many forwards as the others
    # (each gathers parameters collectively), and shards may differ by a row. The reference is a plain
    # module, so it goes a micro-batch at a time.
    old_logprobs = batch.old_logprobs
    if trainer.recompute_old_logprobs:
        old_logprobs = _frozen_logprobs(engine, batch, max(batch.size, 1))
    ref_logprobs = _frozen_logprobs(reference, batch, engine.micro_batch_size) if trainer.kl_coef else None
    skip_idle = trainer.skip_idle_rows and not (trainer.kl_coef or trainer.entropy_coef)
    accumulation = engine.accumulation_steps
    # Under multi-rank ZeRO-3 every rank must run as many forwards as the others; groups per rank vary.
    by_group = trainer.share_prompt_forward and not (engine.zero_stage == 3 and dist.get_world_size() > 1)
    totals: dict[str, float] = {}
    updates = rows_trained = 0
    forward_backward = optimizer = 0.0
    generator = torch.Generator().manual_seed(config.run.seed)
    for _ in range(trainer.ppo_epochs):
        order = torch.randperm(batch.size, generator=generator)
        for mini in torch.tensor_split(order, trainer.mini_batches):
            mask = batch.response_mask[mini]
            total = (
                float(mask.sum()) if trainer.loss_agg == "token-mean" else float((mask.sum(dim=1) > 0).sum())
            )
            if skip_idle:  # the denominator above still counts them: same gradient
                mini = mini[(advantages[mini] != 0).any(dim=1)]
            rows_trained += mini.numel()
            micro_rows = _micro_batches(mini, accumulation, batch.group_index if by_group else None)
            # DeepSpeed steps after exactly `accumulation` backward calls; pad with empty work if short.
            for index in range(accumulation):
                rows = micro_rows[index] if index < len(micro_rows) else mini[:0]
                tick = time.perf_counter()
                if rows.numel():
                    logprobs, entropy = _policy_logprobs(
                        engine, batch, rows, entropy=bool(trainer.entropy_coef), by_group=by_group
                    )
                    loss, stats = policy_loss(
                        logprobs,
                        old_logprobs[rows],
                        advantages[rows],
                        batch.response_mask[rows],
                        clip_low=trainer.clip_low,
                        clip_high=trainer.clip_high,
                        dual_clip=trainer.dual_clip,
                        agg=trainer.loss_agg,
                        ref_logprobs=None if ref_logprobs is None else ref_logprobs[rows],
                        kl_coef=trainer.kl_coef,
                        entropy=entropy,
                        entropy_coef=trainer.entropy_coef,
                    )
                    share = _weight(batch, rows, total, trainer.loss_agg)
                    engine.backward(loss * share * accumulation)  # DeepSpeed divides by `accumulation`
                    for key, value in stats.items():
                        totals[key] = totals.get(key, 0.0) + value * share
                else:
                    engine.backward(sum(p.sum() * 0.0 for p in engine.module.parameters() if p.requires_grad))
                forward_backward += time.perf_counter() - tick
                tick = time.perf_counter()
                engine.step()
                optimizer += time.perf_counter() - tick
            updates += 1
    record = {key: value / updates for key, value in totals.items()}
    record.update(
        {
            "loss": record.get("pg_loss", 0.0),
            "kl": record.get("approx_kl", 0.0),
            "clip_fraction": record.get("clip_frac", 0.0),
            "grad_norm": engine.grad_norm(),
            "learning_rate": engine.learning_rate(),
            "phase/forward_backward": forward_backward,
            "phase/optimizer": optimizer,
            "rows_trained": rows_trained / updates,
        }
    )
    return record
