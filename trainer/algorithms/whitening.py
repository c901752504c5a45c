"""Token-weighted batch whitening (docs/algorithm.md §5), the normalisation GDPO and GD²PO end with."""

import torch
from torch import Tensor

WHITEN_EPS = 1e-8


def masked_whiten(values: Tensor, weights: Tensor, eps: float = WHITEN_EPS) -> Tensor:
    """(v − μ) / sqrt(var + eps) with μ, var weighted by `weights` and the unbiased ΣW/(ΣW − 1) factor.

    `values` and `weights` broadcast together: pass [N, T] values with their [N, T] mask, or — when
    every token of a rollout carries the same value — [N] values with [N] per-rollout token counts,
    which gives identical statistics without touching [N, T]. The output has the shape of `values`
    and is not masked.
    With ΣW ≤ 1 the unbiased variance is undefined (the release raises); this returns zeros instead,
    so a batch with nothing (or a single token) to learn from neither crashes nor produces NaN.
    """
    total = weights.sum()
    if total <= 1:
        return torch.zeros_like(values)
    mean = (values * weights).sum() / total
    centered = values - mean
    variance = (centered.square() * weights).sum() / (total - 1)
    return centered * torch.rsqrt(variance + eps)
