"""Conflict and filtering metrics (docs/algorithm.md §7), identical for every estimator so baselines compare.

All ratios are over rollouts of the batch unless named after groups; see `compute_advantages` for
the full list of keys.
"""

from itertools import combinations

import torch
from torch import Tensor

from trainer.algorithms.batch import Batch
from trainer.algorithms.estimators import Decision


def _mean(flags: Tensor) -> float:
    return float(flags.to(torch.float64).mean())


def _conflict_metrics(batch: Batch, decision: Decision) -> dict[str, float]:
    conflict, dropped = batch.conflict, ~decision.keep
    conflicting = int(conflict.sum())
    rho = batch.rho[conflict]
    if conflicting:
        rho_stats = (float(rho.mean()), float(rho.abs().mean()), float(rho.median()))
        dropped_over_conflicting = int((dropped & conflict).sum()) / conflicting
    else:
        rho_stats, dropped_over_conflicting = (0.0, 0.0, 0.0), 0.0
    group_keep = decision.group_keep
    return {
        "conflict_ratio": _mean(conflict),
        "drop_ratio": _mean(dropped),
        "keep_ratio": _mean(decision.keep),
        "group_keep_ratio_mean": float(group_keep.mean()),
        "group_keep_ratio_min": float(group_keep.min()),
        "group_keep_ratio_max": float(group_keep.max()),
        "group_keep_ratio_std": float(group_keep.std(correction=0)),
        "rho_mean_in_conflict": rho_stats[0],
        "rho_abs_mean_in_conflict": rho_stats[1],
        "rho_median_in_conflict": rho_stats[2],
        "dropped_over_conflicting": dropped_over_conflicting,
        "all_filtered": float(not decision.keep.any()),
    }


def _reward_metrics(batch: Batch, names: list[str]) -> dict[str, float]:
    means = batch.rewards.mean(dim=0).tolist()
    stds = batch.rewards.std(dim=0, correction=0).tolist()
    multi = batch.groups.sizes >= 2
    zero_std = batch.constant[multi].to(torch.float64).mean(dim=0) if multi.any() else torch.zeros(len(names))
    metrics = {}
    for name, mean, std, zero in zip(names, means, stds, zero_std.tolist(), strict=True):
        metrics[f"reward_mean/{name}"] = mean
        metrics[f"reward_std/{name}"] = std
        metrics[f"zero_std_group_ratio/{name}"] = zero
    for (a, name_a), (b, name_b) in combinations(enumerate(names), 2):
        opposite = batch.signs[:, a] * batch.signs[:, b] < 0
        metrics[f"pair_conflict_ratio/{name_a}__{name_b}"] = _mean(opposite)
    return metrics


def advantage_metrics(
    batch: Batch, decision: Decision, names: list[str], *, single_kept_token: bool
) -> dict[str, float]:
    return {
        **_conflict_metrics(batch, decision),
        "single_kept_token": float(single_kept_token),
        **_reward_metrics(batch, names),
    }
