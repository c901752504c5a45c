"""Straightforward per-group loop implementation of docs/algorithm.md: the oracle for the vectorised one.

Readable first: a dict of groups, one loop over them per reward, float64 throughout and token-level
whitening on the full [N, T] tensor. The unit tests cross-check `trainer.algorithms.compute_advantages`
against it (so it lives with the tests) and `bench/advantages.py` times it.
"""

from collections import defaultdict

import torch
from torch import Tensor


def reference_advantages(
    estimator: str,
    rewards: Tensor,
    group_ids: Tensor,
    mask: Tensor,
    *,
    tau: float = 0.8,
    eps: float = 1e-8,
    norm_by_std: bool = True,
    whiten: bool = True,
    weights: list[float] | None = None,
    keep_rule: str = "release",
    reweight: bool = True,
    filter: bool = True,
) -> dict[str, Tensor]:
    """Advantages [N, T] (float64) plus keep [N], conflict [N], rho [N] and κ per rollout [N]."""
    rewards = rewards.double()
    mask = mask.double()
    n, k = rewards.shape
    w = torch.ones(k, dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
    tau = min(max(tau, 0.0), 1.0)
    members = defaultdict(list)
    for i, g in enumerate(group_ids.tolist()):
        members[g].append(i)

    def normalize(column: Tensor) -> Tensor:
        out = torch.zeros(n, dtype=torch.float64)
        for rows in members.values():
            values = column[rows]
            if len(rows) == 1:
                mean, std = 0.0, 1.0
            elif torch.all(values == values[0]):
                continue  # identical rewards: exactly zero (test rewards are exact, so no tolerance)
            else:
                mean, std = values.mean(), values.std()
            out[rows] = (values - mean) / (std + 1e-6) if norm_by_std else values - mean
        return out

    advantages = torch.stack([normalize(rewards[:, j]) for j in range(k)], dim=1)
    score = (advantages * w).sum(dim=1)
    direction = advantages * torch.sign(w)
    conflict = (direction > eps).any(dim=1) & (direction < -eps).any(dim=1)
    rho = score / ((advantages * w).abs().sum(dim=1) + eps)

    if estimator == "grpo":
        adv = normalize(rewards @ w)
        ones = torch.ones(n, dtype=torch.bool)
        return {
            "advantages": adv[:, None] * mask,
            "keep": ones,
            "conflict": conflict,
            "rho": rho,
            "kappa": ones.double(),
        }

    if estimator == "gdpo":
        passes = torch.ones(n, dtype=torch.bool)
    elif estimator == "gd2po_hard":
        passes = ~conflict
    elif keep_rule == "release":
        passes = ~(conflict & (rho.abs() < tau))
    else:
        passes = rho.abs() > tau

    kappa = torch.zeros(n, dtype=torch.float64)
    for rows in members.values():
        kappa[rows] = passes[rows].double().mean()
    keep = passes if filter else torch.ones(n, dtype=torch.bool)
    scaled = score * kappa if reweight else score
    scaled = torch.where(keep, scaled, 0.0)

    token_weights = keep[:, None].double() * mask
    values = scaled[:, None].expand(n, mask.shape[1])
    if whiten:
        total = token_weights.sum()
        if total <= 1:
            values = torch.zeros_like(values)
        else:
            mean = (values * token_weights).sum() / total
            variance = ((values - mean) ** 2 * token_weights).sum() / total * total / (total - 1)
            values = (values - mean) / torch.sqrt(variance + 1e-8)
    return {
        "advantages": values * token_weights,
        "keep": keep,
        "conflict": conflict,
        "rho": rho,
        "kappa": kappa,
    }
