"""`compute_advantages`: validate inputs, run a registered estimator, whiten, broadcast to tokens."""

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from trainer.algorithms.batch import Batch, Options, prepare_batch
from trainer.algorithms.estimators import ESTIMATORS, KEEP_RULES, Decision
from trainer.algorithms.grouping import group_sum, make_groups
from trainer.algorithms.metrics import advantage_metrics
from trainer.algorithms.whitening import masked_whiten


class AdvantageEstimate(NamedTuple):
    """What `compute_advantages` returns (unpacks as ``advantages, metrics, group_keep``)."""

    advantages: Tensor
    """[N, T] float32 token advantages; dropped rollouts are exactly 0."""
    metrics: dict[str, float]
    """Conflict, filtering and reward metrics (see `compute_advantages`)."""
    group_keep: Tensor
    """[G] float64 κ of each group, in ascending group-id order: the fraction of its rollouts passing the
    estimator's keep rule (1 for grpo/gdpo). The per-group keep-ratio histogram observes these, so it
    agrees with ``group_keep_ratio_*`` and ``keep_ratio`` (an all-zero advantage row is not "dropped":
    a kept rollout of a group without variance trains on nothing but is kept)."""


def compute_advantages(
    estimator: str,
    rewards: Tensor,
    group_ids: Tensor,
    response_mask: Tensor,
    *,
    tau: float = 0.8,
    eps: float = 1e-8,
    norm_by_std: bool = True,
    whiten: bool | str = True,
    weights: Sequence[float] | Tensor | None = None,
    keep_rule: str = "release",
    reweight: bool = True,
    filter: bool = True,
    reward_names: Sequence[str] | None = None,
) -> AdvantageEstimate:
    """Token advantages [N, T] (float32), metrics and per-group κ for N rollouts with K rewards
    (docs/algorithm.md).

    Args:
        estimator: a name in `ESTIMATORS` — "grpo", "gdpo", "gd2po_hard", "gd2po_snr".
        rewards: [N, K] finite rewards. group_ids: [N] integer ids, rollouts of one prompt share one
            (any order, sizes and values). response_mask: [N, T] 0/1 (or bool) response tokens.
        tau: SNR threshold, clamped to [0, 1]. eps: ε_s of the sign test and ε_ρ of ρ.
        norm_by_std: divide by the group std (§2); False gives A = r − mean, so rewards with a large
            range dominate ρ. whiten: batch whitening (§5) for gdpo / gd2po_*; False or "none"
            returns the unwhitened scores on response tokens. GRPO never whitens.
        weights: [K] finite reward weights w (default all 1); GRPO sums w·r, the others w·A.
        keep_rule: gd2po_snr only. "release" drops mixed-sign rollouts with |ρ| < τ (|ρ| = τ kept).
            "paper" follows the figure literally: keep iff |ρ| > τ, tested on every rollout, so a
            rollout without signal (ρ = 0) is always dropped (even at τ = 0), a tie |ρ| = τ is
            dropped, and τ = 1 drops everything (|ρ| < 1 because ε_ρ > 0). gd2po_hard always drops
            exactly the mixed-sign rollouts.
        reweight: gd2po_* scale by the group consensus κ = (#passing in group) / |g|; False → κ = 1.
        filter: gd2po_* zero the rollouts failing the keep rule; False keeps them all. κ still counts
            the rollouts passing the rule, so filter=False, reweight=True is the "κ without filter"
            ablation and filter=False, reweight=False is GDPO.
        reward_names: K unique names for per-reward metrics (default r0, r1, ...).

    Dropped rollouts get exactly 0 and stay in the batch; whitening runs over kept response tokens
    only. With no kept token, or exactly one, all advantages are 0 (no NaN, no exception).

    Metrics (floats; ratios over rollouts unless stated):
        conflict_ratio: mixed-sign rollouts. drop_ratio / keep_ratio: rollouts actually zeroed / not.
        group_keep_ratio_mean/min/max/std: κ before the reweight switch, over groups (population
            std); 1 for grpo/gdpo. rho_mean_in_conflict, rho_abs_mean_in_conflict,
            rho_median_in_conflict (lower median): ρ over conflicting rollouts, 0 if there are none.
        dropped_over_conflicting: conflicting rollouts dropped / conflicting rollouts (0 if none).
        all_filtered: 1 if no rollout is kept. single_kept_token: 1 if whitening saw ΣW = 1 and
            returned zeros.
        reward_mean/<name>, reward_std/<name>: raw rewards over the batch (population std).
        zero_std_group_ratio/<name>: groups of size ≥ 2 whose rewards in that dimension are equal.
        pair_conflict_ratio/<a>__<b>: rollouts where rewards a and b push in opposite directions
            (A beyond ±eps, sign flipped for negative weights).
    grpo/gdpo report the same conflict metrics, with drop_ratio 0 and keep_ratio 1.
    """
    batch, decision, response_mask = _decide(
        estimator,
        rewards,
        group_ids,
        response_mask,
        _requested(
            tau=tau,
            eps=eps,
            norm_by_std=norm_by_std,
            whiten=whiten,
            keep_rule=keep_rule,
            reweight=reweight,
            filter=filter,
        ),
        weights,
    )
    names = _check_names(reward_names, batch.rewards.shape[1])
    per_rollout, single_kept_token = _per_rollout_advantages(decision, response_mask, batch.options.whiten)
    advantages = (per_rollout.to(torch.float32).unsqueeze(1) * response_mask).to(torch.float32)
    metrics = advantage_metrics(batch, decision, names, single_kept_token=single_kept_token)
    return AdvantageEstimate(advantages, metrics, decision.group_keep)


def informative_groups(
    estimator: str, rewards: Tensor, group_ids: Tensor, has_response: Tensor, **options: Any
) -> Tensor:
    """[G] bool, in ascending group-id order: whether each group carries signal under ``estimator`` —
    some rollout with a response token is kept with a nonzero score before whitening, i.e. the estimator
    prefers some of the group's responses to others.

    False exactly when every reward is constant within the group (every per-reward advantage is 0, §2),
    when the estimator keeps none of its rollouts (GD²PO κ = 0 with the filter on), when κ = 0 scales
    every score to 0 (the "κ without filter" ablation), or when the combined score is 0 anyway (GRPO on
    rewards whose weighted sum is constant). Without whitening such a group has no gradient at all; with
    it, its kept rollouts all get the same batch-level shift −μ/σ (§5), a push that prefers none of them.
    It depends only on the group's own rollouts, so the trainer can decide it one group at a time
    (``trainer.dynamic_sampling``, trainer/sampling.py).

    ``rewards`` [N, K] and ``group_ids`` [N] as in :func:`compute_advantages`, ``has_response`` [N] bool;
    ``options`` are its keyword options, with its defaults and errors (``whiten`` and ``reward_names``
    change nothing here, so an experiment's options pass through unchanged)."""
    options.pop("reward_names", None)
    weights = options.pop("weights", None)
    has_response = torch.as_tensor(has_response).to(torch.bool)
    batch, decision, _ = _decide(
        estimator, rewards, group_ids, has_response.unsqueeze(1), _requested(**options), weights
    )
    carries = decision.keep & (decision.scores != 0) & has_response.to(decision.keep.device)
    return group_sum(carries.to(torch.float64).unsqueeze(1), batch.groups).squeeze(1) > 0


def _requested(
    *,
    tau: float = 0.8,
    eps: float = 1e-8,
    norm_by_std: bool = True,
    whiten: bool | str = True,
    keep_rule: str = "release",
    reweight: bool = True,
    filter: bool = True,
) -> Options:
    """The estimator options as given (validated by `_decide`), with `compute_advantages`' defaults."""
    return Options(tau, eps, norm_by_std, whiten, keep_rule, reweight, filter)


def _decide(
    estimator: str,
    rewards: Tensor,
    group_ids: Tensor,
    response_mask: Tensor,
    requested: Options,
    weights: Sequence[float] | Tensor | None,
) -> tuple[Batch, Decision, Tensor]:
    """Validate the inputs and options, prepare the batch and run the estimator: (batch, its decision,
    the checked response mask)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; known: {', '.join(sorted(ESTIMATORS))}")
    if requested.keep_rule not in KEEP_RULES:
        raise ValueError(f"unknown keep_rule {requested.keep_rule!r}; known: {', '.join(sorted(KEEP_RULES))}")
    rewards64, group_ids, response_mask = _check_tensors(rewards, group_ids, response_mask)
    options = Options(
        tau=min(max(_finite("tau", requested.tau), 0.0), 1.0),
        eps=_check_eps(requested.eps),
        norm_by_std=bool(requested.norm_by_std),
        whiten=_check_whiten(requested.whiten),
        keep_rule=requested.keep_rule,
        reweight=bool(requested.reweight),
        filter=bool(requested.filter),
    )
    batch = prepare_batch(rewards64, _check_weights(weights, rewards64), make_groups(group_ids), options)
    return batch, ESTIMATORS[estimator](batch), response_mask


def _per_rollout_advantages(decision: Decision, response_mask: Tensor, whiten: bool) -> tuple[Tensor, bool]:
    """Final advantage of each rollout (float64 [N]) and whether whitening saw a single kept token.

    Every token of a rollout carries the same score, so token-weighted whitening with weights
    W[i, t] = keep[i]·m[i, t] equals whitening the [N] scores with weights keep[i]·L[i]: the mask is
    read once here and written once by the caller.
    """
    keep = decision.keep
    if not (decision.whiten and whiten):
        return torch.where(keep, decision.scores, 0.0), False
    lengths = response_mask.sum(dim=1, dtype=torch.float32).to(torch.float64)  # exact below 2**24 tokens
    token_weights = torch.where(keep, lengths, 0.0)
    single_kept_token = bool(token_weights.sum() == 1)
    return torch.where(keep, masked_whiten(decision.scores, token_weights), 0.0), single_kept_token


def _check_tensors(
    rewards: Tensor, group_ids: Tensor, response_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    rewards = torch.as_tensor(rewards)
    group_ids = torch.as_tensor(group_ids)
    response_mask = torch.as_tensor(response_mask)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [N, K], got shape {tuple(rewards.shape)}")
    num_rollouts, num_rewards = rewards.shape
    if num_rollouts == 0:
        raise ValueError("rewards has no rollouts (N == 0)")
    if num_rewards == 0:
        raise ValueError("rewards has no reward dimensions (K == 0)")
    if rewards.dtype == torch.bool or rewards.is_complex():
        raise ValueError(f"rewards must be real numbers, got dtype {rewards.dtype}")
    rewards64 = rewards.to(torch.float64)
    bad = ~torch.isfinite(rewards64)
    if bad.any():
        row, col = bad.nonzero()[0].tolist()
        raise ValueError(
            f"rewards contain {int(bad.sum())} NaN/inf value(s), first at rollout {row}, reward {col}"
        )
    if group_ids.shape != (num_rollouts,):
        raise ValueError(f"group_ids must be [N] = [{num_rollouts}], got shape {tuple(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be integers, got dtype {group_ids.dtype}")
    if response_mask.dim() != 2 or response_mask.shape[0] != num_rollouts:
        raise ValueError(
            f"response_mask must be [N, T] with N = {num_rollouts}, got {tuple(response_mask.shape)}"
        )
    return rewards64, group_ids.to(torch.int64), response_mask


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_eps(eps: float) -> float:
    eps = _finite("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return eps


def _check_whiten(whiten: bool | str) -> bool:
    if whiten == "none":
        return False
    if not isinstance(whiten, bool):
        raise ValueError(f"whiten must be True, False or 'none', got {whiten!r}")
    return whiten


def _check_weights(weights: Sequence[float] | Tensor | None, rewards: Tensor) -> Tensor:
    num_rewards = rewards.shape[1]
    if weights is None:
        return rewards.new_ones(num_rewards)
    weights = torch.as_tensor(weights, dtype=torch.float64, device=rewards.device)
    if weights.shape != (num_rewards,):
        raise ValueError(f"weights must have K = {num_rewards} entries, got shape {tuple(weights.shape)}")
    if not torch.isfinite(weights).all():
        raise ValueError(f"weights must be finite, got {weights.tolist()}")
    return weights


def _check_names(names: Sequence[str] | None, num_rewards: int) -> list[str]:
    if names is None:
        return [f"r{k}" for k in range(num_rewards)]
    names = [str(name) for name in names]
    if len(names) != num_rewards:
        raise ValueError(f"reward_names must have K = {num_rewards} entries, got {len(names)}")
    if len(set(names)) != num_rewards:
        raise ValueError(f"reward_names must be unique, got {names}")
    return names
