"""One training step: rewards → advantages (GRPO / GDPO / GD²PO) → PPO-clip over mini-batches and
epochs → DeepSpeed backward/step. Micro-batch losses are weighted so the configured aggregation
(token-mean by default) is over the whole mini-batch, as if it were one batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from proto.config import ExperimentConfig, TrainerConfig
from trainer.algorithms import AdvantageEstimate, compute_advantages
from trainer.batching import TrainBatch
from trainer.engine import PolicyEngine, ReferencePolicy
from trainer.loss import policy_loss
from trainer.metrics import StepTimer

TRAINER_CONTROLLED = frozenset({"adaptive_tau"})
"""``trainer.advantage`` options that configure the trainer's own controllers rather than one call of
``compute_advantages``: adaptive τ sets the ``tau`` each step passes (trainer/algorithms/adaptive_tau.py)."""


def advantages_for(
    batch: TrainBatch, config: ExperimentConfig, tau: float | None = None
) -> AdvantageEstimate:
    """The configured estimator on a built batch (see :func:`estimate_advantages`)."""
    return estimate_advantages(batch.rewards, batch.group_index, batch.response_mask, config, tau)


def estimate_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    response_mask: torch.Tensor,
    config: ExperimentConfig,
    tau: float | None = None,
) -> AdvantageEstimate:
    """``compute_advantages`` with the experiment's options: ``trainer.advantage`` holds exactly the options
    of its estimator, named as its keyword arguments (``adaptive_tau`` aside: it is the trainer's
    controller, whose current τ comes in as ``tau`` and replaces the configured one). Shapes as
    ``compute_advantages``: rewards [N, K], group_index [N], response_mask [N, T]."""
    return compute_advantages(
        config.trainer.advantage.estimator,
        rewards,
        group_index,
        response_mask,
        **estimator_options(config, tau),
    )


def estimator_options(config: ExperimentConfig, tau: float | None = None) -> dict:
    """The keyword arguments of ``compute_advantages`` (and ``informative_groups``) for this experiment:
    ``trainer.advantage``'s options, the reward weights and names, and ``tau`` when given (the adaptive
    controller's current τ) in place of the configured one."""
    options = config.trainer.advantage.model_dump(exclude={"estimator", *TRAINER_CONTROLLED})
    if tau is not None:
        options["tau"] = tau
    return {**options, "weights": [r.weight for r in config.rewards], "reward_names": config.reward_names}


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


def _denominator(mask: torch.Tensor, agg: str) -> float:
    """The aggregation's denominator for these rows: valid tokens, or sequences with one."""
    return float(mask.sum()) if agg == "token-mean" else float((mask.sum(dim=1) > 0).sum())


def _rows_that_train(
    advantages: torch.Tensor, has_response: torch.Tensor, trainer: TrainerConfig
) -> torch.Tensor:
    """[N] bool: rows with a gradient. Without a KL or entropy term a row whose advantage is 0 on every
    token (dropped by the conflict filter, or a group without variance) adds exactly nothing: its PPO
    term is −0·ratio. Loss statistics average over these rows whether idle rows are forwarded or not."""
    if trainer.loss.kl_coef or trainer.loss.entropy_coef:
        return has_response  # a row without a response token has nothing to train
    return (advantages != 0).any(dim=1)


def _agreed_count(count: int) -> int:
    """The most micro-batches any rank has. Every rank must call backward as often as the others (ZeRO
    reduces gradients collectively), so a rank with fewer pads with empty ones."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return count
    most = torch.tensor([count])
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most)


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
    # where, not ×: a −inf log-prob at a padding position times 0 would be NaN
    return torch.where(batch.response_mask.bool(), torch.cat(parts), 0.0)


@dataclass
class _StepInputs:
    """What every micro-batch of a step reads, computed once before the first update."""

    old_logprobs: torch.Tensor  # [N, L−1] π_old: the rollout's, or recomputed
    ref_logprobs: torch.Tensor | None  # [N, L−1] the frozen reference's, when the loss has a KL term
    has_response: torch.Tensor  # [N] bool: rows with a response token (others have nothing to score)
    trains: torch.Tensor  # [N] bool: rows with a gradient (`_rows_that_train`)
    by_group: bool  # forward each group's shared prompt once


@dataclass
class _StepStats:
    """Loss statistics and counts accumulated over a step's optimizer steps."""

    totals: dict[str, float] = field(default_factory=dict)
    updates: int = 0
    rows_trained: int = 0
    tokens_trained: float = 0.0

    def add(self, values: dict[str, float], share: float, stats_share: float) -> None:
        for key, value in values.items():
            weight = share if key == "pg_loss" else stats_share  # see train_on's docstring
            self.totals[key] = self.totals.get(key, 0.0) + value * weight

    def summary(self, engine: PolicyEngine) -> dict[str, float]:
        record = {key: value / self.updates for key, value in self.totals.items()}
        record.update(
            {
                "loss": record.get("pg_loss", 0.0),
                "kl": record.get("approx_kl", 0.0),
                "clip_fraction": record.get("clip_frac", 0.0),
                "grad_norm": engine.grad_norm() if self.updates else 0.0,
                "learning_rate": engine.learning_rate(),
                "rows_trained": self.rows_trained / self.updates if self.updates else 0.0,
                "optimizer_steps": float(self.updates),
                "tokens_trained": self.tokens_trained,
            }
        )
        return record


def train_on(
    engine: PolicyEngine,
    batch: TrainBatch,
    advantages: torch.Tensor,
    config: ExperimentConfig,
    reference: ReferencePolicy | None = None,
    *,
    timer: StepTimer | None = None,
) -> dict[str, float]:
    """PPO epochs × mini-batches, each one optimizer step; returns loss stats. Forward+backward and
    optimizer time go to ``timer`` (the trainer's step timer; a fresh one by default).

    A mini-batch has as many micro-batches as it has rows to forward (at most the configured
    ``gradient_accumulation_steps``), and one with no row that trains skips its optimizer step
    altogether: with AdamW a zero-gradient step would still move the weights (momentum from earlier
    steps, decoupled weight decay) — an update no data asked for — and cost a full backward. The
    optimizer state and learning-rate schedule stay as they were; ``optimizer_steps`` counts the steps
    taken. Loss statistics (ratio_mean, approx_kl, clip fractions, entropy) are token means over the rows
    that train (``_rows_that_train``), so ``skip_idle_rows`` changes what is forwarded, never what is
    reported; ``pg_loss``/``loss`` is the optimised objective, whose aggregation counts every valid
    token of the mini-batch (idle rows add 0 to it). ``rows_trained`` is the mean number of rows
    forwarded per optimizer step, ``tokens_trained`` the response tokens forwarded in all of them (this
    rank's shard)."""
    timer = timer or StepTimer()
    inputs = _step_inputs(engine, batch, advantages, config.trainer, reference)
    stats = _StepStats()
    generator = torch.Generator().manual_seed(config.run.seed)
    for _ in range(config.trainer.ppo_epochs):
        order = torch.randperm(batch.size, generator=generator)
        for mini in torch.tensor_split(order, config.trainer.mini_batches):
            _update(engine, batch, advantages, mini, inputs, config.trainer, stats, timer)
    return stats.summary(engine)


def _step_inputs(
    engine: PolicyEngine,
    batch: TrainBatch,
    advantages: torch.Tensor,
    trainer: TrainerConfig,
    reference: ReferencePolicy | None,
) -> _StepInputs:
    if trainer.loss.kl_coef and reference is None:
        raise ValueError("trainer.loss.kl_coef > 0 needs a reference policy")
    # The engine's shard in one forward: under ZeRO-3 every rank must run as many forwards as the others
    # (each gathers parameters collectively), and shards may differ by a row. The reference is a plain
    # module, so it goes a micro-batch at a time.
    old_logprobs = batch.old_logprobs
    if trainer.loss.recompute_old_logprobs:
        old_logprobs = _frozen_logprobs(engine, batch, max(batch.size, 1))
    ref_logprobs = (
        _frozen_logprobs(reference, batch, engine.micro_batch_size) if trainer.loss.kl_coef else None
    )
    has_response = batch.response_mask.sum(dim=1) > 0
    return _StepInputs(
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        has_response=has_response,
        trains=_rows_that_train(advantages, has_response, trainer),
        # Under multi-rank ZeRO-3 every rank must run as many forwards as the others; groups per rank vary.
        by_group=trainer.share_prompt_forward and not (engine.zero_stage == 3 and dist.get_world_size() > 1),
    )


def _update(
    engine: PolicyEngine,
    batch: TrainBatch,
    advantages: torch.Tensor,
    mini: torch.Tensor,
    inputs: _StepInputs,
    trainer: TrainerConfig,
    stats: _StepStats,
    timer: StepTimer,
) -> None:
    """One mini-batch: its micro-batches forwarded and backwarded, one optimizer step — or none when no
    row trains on any rank (see `train_on`)."""
    total = _denominator(batch.response_mask[mini], trainer.loss.agg)
    stats_total = float(batch.response_mask[mini[inputs.trains[mini]]].sum())
    # Skipped rows still count in the denominator above: same gradient. A row without a response token
    # is never forwarded: it has no target to score.
    mini = mini[inputs.trains[mini] if trainer.skip_idle_rows else inputs.has_response[mini]]
    micro_rows = _micro_batches(
        mini, engine.accumulation_steps, batch.group_index if inputs.by_group else None
    )
    count = _agreed_count(len(micro_rows))
    if count == 0:
        return  # nothing trains on any rank: no optimizer step
    stats.rows_trained += mini.numel()
    stats.tokens_trained += float(batch.response_mask[mini].sum())
    for index in range(count):
        rows = micro_rows[index] if index < len(micro_rows) else mini[:0]
        with timer.phase("forward_backward"):
            _forward_backward(
                engine,
                batch,
                advantages,
                rows,
                inputs,
                trainer,
                stats,
                total,
                stats_total,
                index == count - 1,
            )
        with timer.phase("optimizer"):
            engine.step()
    stats.updates += 1


def _forward_backward(
    engine: PolicyEngine,
    batch: TrainBatch,
    advantages: torch.Tensor,
    rows: torch.Tensor,
    inputs: _StepInputs,
    trainer: TrainerConfig,
    stats: _StepStats,
    total: float,
    stats_total: float,
    last: bool,
) -> None:
    """One micro-batch's loss, weighted into its mini-batch's aggregation, and its backward."""
    if not rows.numel():  # another rank still has a micro-batch: take part in its gradient reduction
        zero = sum(p.sum() * 0.0 for p in engine.module.parameters() if p.requires_grad)
        engine.backward(zero, last=last)
        return
    loss = trainer.loss
    logprobs, entropy = _policy_logprobs(
        engine, batch, rows, entropy=bool(loss.entropy_coef), by_group=inputs.by_group
    )
    value, values = policy_loss(
        logprobs,
        inputs.old_logprobs[rows],
        advantages[rows],
        batch.response_mask[rows],
        clip_low=loss.clip_low,
        clip_high=loss.clip_high,
        dual_clip=loss.dual_clip,
        agg=loss.agg,
        ref_logprobs=None if inputs.ref_logprobs is None else inputs.ref_logprobs[rows],
        kl_coef=loss.kl_coef,
        entropy=entropy,
        entropy_coef=loss.entropy_coef,
        stats_mask=batch.response_mask[rows] * inputs.trains[rows, None],
    )
    # total is 0 only when no row of the mini-batch has a response token (idle rows forwarded with
    # skip_idle_rows off): nothing to weigh, zero gradient.
    share = _denominator(batch.response_mask[rows], loss.agg) / total if total else 0.0
    # DeepSpeed divides every micro-batch loss by the accumulation steps: undo it, the shares already
    # make the micro-batches add up to the mini-batch's aggregation.
    engine.backward(value * share * engine.accumulation_steps, last=last)
    stats_share = float(batch.response_mask[rows[inputs.trains[rows]]].sum()) / max(stats_total, 1.0)
    stats.add(values, share, stats_share)
