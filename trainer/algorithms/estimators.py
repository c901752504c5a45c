"""Advantage estimators: each is one registered function from a prepared `Batch` to a `Decision`.

The shared work — validation, per-reward normalisation, conflict and ρ, whitening, broadcasting to
tokens, metrics — lives in `compute_advantages`. An estimator only decides which rollouts train and
with which per-rollout score, so adding one is one function decorated with `@register_estimator`.
Section numbers (§) refer to docs/algorithm.md.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from trainer.algorithms.batch import Batch
from trainer.algorithms.grouping import group_mean, group_normalize


@dataclass(frozen=True)
class Decision:
    """What an estimator returns; `compute_advantages` whitens, masks and broadcasts it to tokens."""

    scores: Tensor  # [N] float64 per-rollout advantage before batch whitening
    keep: Tensor  # [N] bool: rollouts that train; the others end with advantage exactly 0
    group_keep: Tensor  # [G] float64 fraction of each group passing the keep rule (κ, for metrics)
    whiten: bool  # whether batch whitening applies (if the caller asks for it)


Estimator = Callable[[Batch], Decision]
ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    """Register `fn(batch) -> Decision` under `name` for `compute_advantages(name, ...)`."""

    def register(fn: Estimator) -> Estimator:
        if name in ESTIMATORS:
            raise ValueError(f"estimator {name!r} is already registered")
        ESTIMATORS[name] = fn
        return fn

    return register


def _release_rule(batch: Batch) -> Tensor:
    """Release: drop only mixed-sign rollouts whose |ρ| < τ; |ρ| = τ is kept."""
    return ~(batch.conflict & (batch.rho.abs() < batch.options.tau))


def _paper_rule(batch: Batch) -> Tensor:
    """Paper figure: keep iff |ρ| > τ, tested on every rollout (see `compute_advantages`)."""
    return batch.rho.abs() > batch.options.tau


KEEP_RULES: dict[str, Callable[[Batch], Tensor]] = {"release": _release_rule, "paper": _paper_rule}


def _keep_all(batch: Batch, scores: Tensor, *, whiten: bool) -> Decision:
    keep = torch.ones_like(scores, dtype=torch.bool)
    group_keep = torch.ones(batch.groups.count, dtype=torch.float64, device=scores.device)
    return Decision(scores=scores, keep=keep, group_keep=group_keep, whiten=whiten)


def _consensus(batch: Batch, passes: Tensor) -> Decision:
    """GD²PO §4.4–4.5: κ-weighted combined advantage, zero for dropped rollouts.

    κ is the fraction of the group passing the keep rule whether or not the filter is on, so the
    ablation "κ without filter" (filter=False, reweight=True) scales every rollout by its group's
    consensus instead of degenerating to GDPO.
    """
    kappa = group_mean(passes.to(torch.float64), batch.groups)
    keep = passes if batch.options.filter else torch.ones_like(passes)
    scores = batch.combined * kappa[batch.groups.index] if batch.options.reweight else batch.combined
    return Decision(scores=torch.where(keep, scores, 0.0), keep=keep, group_keep=kappa, whiten=True)


@register_estimator("grpo")
def grpo(batch: Batch) -> Decision:
    """§3: group-normalise the weighted reward sum once; GRPO never batch-whitens."""
    summed = (batch.rewards @ batch.weights).unsqueeze(1)
    scores, _ = group_normalize(summed, batch.groups, norm_by_std=batch.options.norm_by_std)
    return _keep_all(batch, scores.squeeze(1), whiten=False)


@register_estimator("gdpo")
def gdpo(batch: Batch) -> Decision:
    """§3: weighted sum of the per-reward advantages, then batch whitening over all tokens."""
    return _keep_all(batch, batch.combined, whiten=True)


@register_estimator("gd2po_hard")
def gd2po_hard(batch: Batch) -> Decision:
    """§4.3 Hard: drop every mixed-sign rollout."""
    return _consensus(batch, ~batch.conflict)


@register_estimator("gd2po_snr")
def gd2po_snr(batch: Batch) -> Decision:
    """§4.3 SNR: drop mixed-sign rollouts with weak net signal, per `keep_rule`."""
    return _consensus(batch, KEEP_RULES[batch.options.keep_rule](batch))
