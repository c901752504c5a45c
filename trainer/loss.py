"""PPO-clip policy loss with dual clip (docs/algorithm.md §8) and the log-prob / entropy helpers it needs."""

from collections.abc import Callable

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
"""|log π − log π_old| is clamped before exp so one stale token cannot overflow the ratio."""

KL_CLAMP = 10.0
"""Upper bound of the per-token k3 KL, so a single far-off token cannot dominate the penalty."""

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    agg: str = "token-mean",
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    stats_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Scalar loss = agg(pg) + kl_coef·agg(KL to ref) − entropy_coef·agg(entropy), plus stats.

    All tensors are [N, T]. pg = max(−A·ratio, −A·clip(ratio, 1 − clip_low, 1 + clip_high)) with
    ratio = exp(clamp(logπ − logπ_old, ±20)); for A < 0 also min(pg, −dual_clip·A) (None disables).
    Aggregation over valid tokens: "token-mean" divides by every valid token of the batch (rollouts
    with zero advantage still count); "seq-mean-token-mean" / "seq-mean-token-sum" average per-sequence
    means / sums over sequences with at least one valid token. An empty batch gives loss 0.
    KL to `ref_logprobs` is the low-variance k3 estimator exp(ref − logπ) − (ref − logπ) − 1, clamped
    to [0, 10]. Only `logprobs` and `entropy` receive gradients; the other inputs are detached.

    Stats: pg_loss (aggregated like the loss), and token means over the tokens of `stats_mask` (default
    `response_mask`; ``trainer.step.train_on`` narrows it to the rows that train): clip_frac (tokens
    where the ratio clip is active), dual_clip_frac, approx_kl (k3 against the old policy), kl_ref (0
    without a reference), entropy (0 without one), ratio_mean.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown agg {agg!r}; known: {', '.join(AGGREGATIONS)}")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")
    if kl_coef and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    if entropy_coef and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")
    named = {"old_logprobs": old_logprobs, "advantages": advantages, "response_mask": response_mask}
    named |= {"ref_logprobs": ref_logprobs, "entropy": entropy, "stats_mask": stats_mask}
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, logprobs {tuple(logprobs.shape)}")

    mask = response_mask.to(logprobs.dtype)
    advantages = advantages.detach()
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    pg = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    dual_active = torch.zeros_like(clip_active)
    if dual_clip is not None:
        cap = -dual_clip * advantages
        dual_active = (advantages < 0) & (pg > cap)
        pg = torch.where(dual_active, cap, pg)

    aggregate = _aggregator(mask, agg)
    token_mean = _aggregator(mask if stats_mask is None else stats_mask.to(mask.dtype), "token-mean")
    pg_loss = aggregate(pg)
    loss = pg_loss
    kl_ref = torch.zeros(())
    if ref_logprobs is not None:
        kl = _k3(ref_logprobs.detach() - logprobs)
        loss = loss + kl_coef * aggregate(kl)
        kl_ref = token_mean(kl)
    mean_entropy = torch.zeros(())
    if entropy is not None:
        loss = loss - entropy_coef * aggregate(entropy)
        mean_entropy = token_mean(entropy)

    with torch.no_grad():
        stats = {
            "pg_loss": pg_loss,
            "clip_frac": token_mean(clip_active.to(mask.dtype)),
            "dual_clip_frac": token_mean(dual_active.to(mask.dtype)),
            "approx_kl": token_mean(_k3(-log_ratio)),
            "kl_ref": kl_ref,
            "entropy": mean_entropy,
            "ratio_mean": token_mean(ratio),
        }
        return loss, {name: float(value) for name, value in stats.items()}


def _k3(log_ratio: Tensor) -> Tensor:
    """Low-variance KL estimate from log(q/p) per token: exp(x) − x − 1 ≥ 0 (Schulman's k3)."""
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (log_ratio.exp() - log_ratio - 1).clamp(0.0, KL_CLAMP)


def _aggregator(mask: Tensor, agg: str) -> Callable[[Tensor], Tensor]:
    """Reduce [N, T] per-token values to a scalar over the valid tokens of `mask`."""
    if agg == "token-mean":
        total = mask.sum().clamp_min(1)
        return lambda values: (values * mask).sum() / total
    lengths = mask.sum(dim=1)
    sequences = (lengths > 0).sum().clamp_min(1)
    per_token = lengths.clamp_min(1) if agg == "seq-mean-token-mean" else torch.ones_like(lengths)
    return lambda values: ((values * mask).sum(dim=1) / per_token).sum() / sequences


def token_logprobs_from_logits(logits: Tensor, token_ids: Tensor, chunk_rows: int = 256) -> Tensor:
    """log softmax(logits)[token_ids] in float32, shape of `token_ids`.

    Works on `chunk_rows` positions at a time, so bf16 logits are upcast one slice at a time and the
    full [..., V] log-softmax is never materialised.
    """
    return _chunked(
        lambda rows, ids: rows.gather(-1, ids).squeeze(-1) - rows.logsumexp(dim=-1),
        logits,
        chunk_rows,
        token_ids.reshape(-1, 1),
    ).reshape(token_ids.shape)


def entropy_from_logits(logits: Tensor, chunk_rows: int = 256) -> Tensor:
    """Entropy of softmax(logits) per position in float32: −Σ p·log p over the tokens, with p·log p = 0
    where p = 0.

    A logit of −inf (a token masked out) has p = 0 and contributes nothing, so ``[0, −inf]`` has entropy
    0 and ``[0, 0, −inf]`` ln 2, with finite gradients. Computed as p·max(log p, finfo.min) on the
    normalised log-probs, as ``torch.distributions.Categorical`` does: the naive logsumexp(l) − Σ p·l
    takes 0·(−inf) = NaN for a masked token, in the value and in the gradient of every position, and
    subtracts two large numbers when the logits are large.
    """
    return _chunked(_entropy_rows, logits, chunk_rows).reshape(logits.shape[:-1])


def _entropy_rows(rows: Tensor) -> Tensor:
    log_p = rows.log_softmax(dim=-1)
    return -(log_p.exp() * log_p.clamp(min=torch.finfo(log_p.dtype).min)).sum(dim=-1)


def _chunked(fn: Callable[..., Tensor], logits: Tensor, chunk_rows: int, *aligned: Tensor) -> Tensor:
    """`fn(float32 logits rows [n, V], *aligned rows) -> [n]` over chunks of the flattened positions."""
    rows = logits.reshape(-1, logits.shape[-1])
    chunks = [
        fn(rows[start : start + chunk_rows].float(), *(a[start : start + chunk_rows] for a in aligned))
        for start in range(0, rows.shape[0], chunk_rows)
    ]
    return torch.cat(chunks) if chunks else rows.new_zeros(0, dtype=torch.float32)
