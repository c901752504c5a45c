"""The per-rollout quantities every estimator and metric reads, computed once per batch.

Everything here is float64 on [N] or [N, K] vectors: per-reward group advantages (docs/algorithm.md §2),
their weighted sum, the conflict flag (§4.2) and the signal-to-noise ratio ρ (§4.3).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from trainer.algorithms.grouping import Groups, group_normalize


@dataclass(frozen=True)
class Options:
    """Validated estimator settings (see `compute_advantages` for their meaning)."""

    tau: float
    eps: float
    norm_by_std: bool
    whiten: bool
    keep_rule: str
    reweight: bool
    filter: bool


@dataclass(frozen=True)
class Batch:
    """What an estimator sees; float64 unless noted."""

    rewards: Tensor  # [N, K] raw rewards
    weights: Tensor  # [K] reward weights w
    groups: Groups
    advantages: Tensor  # [N, K] per-reward group advantages A (§2)
    constant: Tensor  # [G, K] bool: the group's rewards in that dimension are all equal
    combined: Tensor  # [N] S = Σ_k w_k·A_ik
    signs: Tensor  # [N, K] int8 direction of each reward, sign(w_k)·A_ik beyond ±eps, else 0
    conflict: Tensor  # [N] bool: some reward pushes up and another down (§4.2)
    rho: Tensor  # [N] ρ = S / (Σ_k |w_k·A_ik| + eps) (§4.3)
    options: Options


def prepare_batch(rewards: Tensor, weights: Tensor, groups: Groups, options: Options) -> Batch:
    """Compute the shared quantities from validated float64 `rewards` [N, K] and `weights` [K].

    The conflict test (§4.2) reads sign(w_k)·A_ik rather than A_ik: the same for the positive weights
    of every published run, while a zero-weight reward cannot make a rollout conflicting and a
    negative weight (a cost) pushes in the opposite direction of its advantage.
    """
    advantages, constant = group_normalize(rewards, groups, norm_by_std=options.norm_by_std)
    weighted = advantages * weights
    combined = weighted.sum(dim=1)
    directions = advantages * torch.sign(weights)
    signs = (directions > options.eps).to(torch.int8) - (directions < -options.eps).to(torch.int8)
    conflict = (signs > 0).any(dim=1) & (signs < 0).any(dim=1)
    rho = combined / (weighted.abs().sum(dim=1) + options.eps)
    return Batch(
        rewards=rewards,
        weights=weights,
        groups=groups,
        advantages=advantages,
        constant=constant,
        combined=combined,
        signs=signs,
        conflict=conflict,
        rho=rho,
        options=options,
    )
