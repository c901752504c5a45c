"""Per-group statistics over rollouts, vectorised with scatter operations.

Group ids are opaque (any order, sizes or values, including negative or huge ones): `torch.unique`
maps them to dense indices, so every statistic is one `index_add_` / `scatter_reduce_` over the batch
instead of a Python loop over groups. Statistics are float64 so the signs that the conflict test of
docs/algorithm.md §4.2 reads off the advantages are not polluted by float32 residuals.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

STD_EPS = 1e-6
"""Added to the group std before dividing (docs/algorithm.md §2), as in the release."""

CONSTANT_RTOL = 1e-12
"""A group is constant in a dimension when max − min ≤ CONSTANT_RTOL·max(|max|, |min|).

This absorbs float64 arithmetic noise (0.1 + 0.2 vs 0.3 in a weighted sum) and is far below the
resolution of float32 rewards (~6e-8 relative), so genuinely different rewards are never merged.
"""


@dataclass(frozen=True)
class Groups:
    """Dense group structure of a batch: `index[i]` is the group of rollout i, `sizes[g]` its size."""

    index: Tensor
    sizes: Tensor

    @property
    def count(self) -> int:
        return self.sizes.numel()


def make_groups(group_ids: Tensor) -> Groups:
    _, index, sizes = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return Groups(index=index, sizes=sizes)


def group_sum(values: Tensor, groups: Groups) -> Tensor:
    """Sum of `values` [N, ...] over the rollouts of each group -> [G, ...]."""
    out = values.new_zeros((groups.count, *values.shape[1:]))
    return out.index_add_(0, groups.index, values)


def group_mean(values: Tensor, groups: Groups) -> Tensor:
    """Mean of `values` [N] over the rollouts of each group -> [G]."""
    return group_sum(values, groups) / groups.sizes.to(values.dtype)


def _group_reduce(values: Tensor, groups: Groups, reduce: str) -> Tensor:
    index = groups.index.unsqueeze(1).expand_as(values)
    out = values.new_empty((groups.count, values.shape[1]))
    return out.scatter_reduce_(0, index, values, reduce=reduce, include_self=False)


def group_normalize(rewards: Tensor, groups: Groups, *, norm_by_std: bool) -> tuple[Tensor, Tensor]:
    """Per-column group advantages of docs/algorithm.md §2 for float64 `rewards` [N, K].

    Returns `(advantages [N, K], constant [G, K])`. A group of size ≥ 2 whose rewards in a column are
    all equal (see `CONSTANT_RTOL`) gets exactly 0, for any group size. A singleton group uses mean 0
    and std 1 like the release, so its advantage is r / (1 + 1e-6) (r itself without std division);
    singletons are never flagged constant. The std is the unbiased (n − 1) one.
    """
    singleton = (groups.sizes == 1).unsqueeze(1)
    high = _group_reduce(rewards, groups, "amax")
    low = _group_reduce(rewards, groups, "amin")
    constant = (high - low <= CONSTANT_RTOL * torch.maximum(high.abs(), low.abs())) & ~singleton

    sizes = groups.sizes.to(torch.float64).unsqueeze(1)
    mean = torch.where(singleton, 0.0, group_sum(rewards, groups) / sizes)
    centered = (rewards - mean[groups.index]).masked_fill(constant[groups.index], 0.0)
    if not norm_by_std:
        return centered, constant
    variance = group_sum(centered.square(), groups) / (sizes - 1).clamp_min(1)
    std = torch.where(singleton, 1.0, variance.sqrt())
    return centered / (std[groups.index] + STD_EPS), constant
