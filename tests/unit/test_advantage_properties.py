"""Hypothesis properties of `compute_advantages`, cross-checked against the per-group loop reference."""

import math

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference_loop import reference_advantages

from trainer.algorithms import compute_advantages

FAST = settings(max_examples=60, deadline=None)
# Dyadic rewards: sums are exact, so ties and constant groups occur often and mean zero is exact.
REWARD_VALUES = [-3.0, -1.5, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 2.0, 3.0]
RATIO_KEYS = (
    "conflict_ratio",
    "drop_ratio",
    "keep_ratio",
    "group_keep_ratio_mean",
    "group_keep_ratio_min",
    "group_keep_ratio_max",
    "dropped_over_conflicting",
    "all_filtered",
    "single_kept_token",
)


@st.composite
def batches(draw, max_rewards=4):
    """rewards [N, K], shuffled opaque group ids [N] (any values) and a [N, T] mask with random lengths."""
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=6))
    num_rewards = draw(st.integers(1, max_rewards))
    labels = draw(
        st.lists(st.integers(-(2**62), 2**62), min_size=len(sizes), max_size=len(sizes), unique=True)
    )
    ids = [label for label, size in zip(labels, sizes, strict=True) for _ in range(size)]
    order = draw(st.permutations(range(len(ids))))
    rewards = draw(
        st.lists(
            st.lists(st.sampled_from(REWARD_VALUES), min_size=num_rewards, max_size=num_rewards),
            min_size=len(ids),
            max_size=len(ids),
        )
    )
    width = draw(st.integers(0, 6))
    lengths = draw(st.lists(st.integers(0, width), min_size=len(ids), max_size=len(ids)))
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()
    return torch.tensor(rewards, dtype=torch.float64), torch.tensor([ids[i] for i in order]), mask


@st.composite
def options(draw, num_rewards):
    return {
        "tau": draw(st.sampled_from([-0.5, 0.0, 0.3, 0.5, 0.8, 0.95, 1.0, 1.5])),
        "norm_by_std": draw(st.booleans()),
        "whiten": draw(st.booleans()),
        "keep_rule": draw(st.sampled_from(["release", "paper"])),
        "reweight": draw(st.booleans()),
        "filter": draw(st.booleans()),
        "weights": draw(
            st.none()
            | st.lists(
                st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0]), min_size=num_rewards, max_size=num_rewards
            )
        ),
    }


def clear_of_threshold(reference: dict, tau: float) -> bool:
    """No |ρ| within float noise of τ, where summation order could flip a keep decision."""
    return bool(((reference["rho"].abs() - min(max(tau, 0.0), 1.0)).abs() > 1e-9).all())


@FAST
@given(st.data())
def test_matches_per_group_loop_reference(data):
    rewards, groups, mask = data.draw(batches())
    estimator = data.draw(st.sampled_from(["grpo", "gdpo", "gd2po_hard", "gd2po_snr"]))
    kwargs = data.draw(options(rewards.shape[1]))
    reference = reference_advantages(estimator, rewards, groups, mask, **kwargs)
    assume(clear_of_threshold(reference, kwargs["tau"]))
    advantages, metrics, _ = compute_advantages(estimator, rewards, groups, mask, **kwargs)
    torch.testing.assert_close(advantages.double(), reference["advantages"], atol=1e-5, rtol=1e-5)
    assert metrics["conflict_ratio"] == reference["conflict"].double().mean().item()
    assert metrics["keep_ratio"] == reference["keep"].double().mean().item()
    kappa = torch.tensor(
        list(dict(zip(groups.tolist(), reference["kappa"].tolist(), strict=True)).values()),
        dtype=torch.float64,
    )
    assert math.isclose(metrics["group_keep_ratio_mean"], kappa.mean().item(), abs_tol=1e-12)
    assert (metrics["group_keep_ratio_min"], metrics["group_keep_ratio_max"]) == (kappa.min(), kappa.max())
    assert torch.all(advantages[~reference["keep"]] == 0)


@FAST
@given(st.data())
def test_invariant_to_row_order_and_group_labels(data):
    rewards, groups, mask = data.draw(batches())
    estimator = data.draw(st.sampled_from(["grpo", "gdpo", "gd2po_hard", "gd2po_snr"]))
    kwargs = data.draw(options(rewards.shape[1]))
    assume(
        clear_of_threshold(reference_advantages(estimator, rewards, groups, mask, **kwargs), kwargs["tau"])
    )
    order = torch.tensor(data.draw(st.permutations(range(rewards.shape[0]))))
    _, labels = torch.unique(groups, return_inverse=True)
    relabelled = labels[order] * -7919 + 10**15  # a different injective labelling
    base, base_metrics, _ = compute_advantages(estimator, rewards, groups, mask, **kwargs)
    moved, moved_metrics, _ = compute_advantages(estimator, rewards[order], relabelled, mask[order], **kwargs)
    torch.testing.assert_close(moved, base[order], atol=1e-5, rtol=1e-5)
    assert base_metrics.keys() == moved_metrics.keys()
    for key, value in base_metrics.items():
        assert math.isclose(moved_metrics[key], value, rel_tol=1e-9, abs_tol=1e-9), key


@FAST
@given(st.data())
def test_tau_and_single_reward_identities(data):
    rewards, groups, mask = data.draw(batches())
    kwargs = data.draw(options(rewards.shape[1]))
    kwargs.pop("tau")
    kwargs["keep_rule"] = "release"

    def advantages(estimator, rows=rewards, **extra):
        return compute_advantages(estimator, rows, groups, mask, **kwargs, **extra)[0]

    gdpo, hard = advantages("gdpo"), advantages("gd2po_hard")
    assert torch.equal(advantages("gd2po_snr", tau=0.0), gdpo)
    assert torch.equal(advantages("gd2po_snr", tau=-2.0), gdpo)
    assert torch.equal(advantages("gd2po_snr", tau=1.0), hard)
    assert torch.equal(advantages("gd2po_snr", tau=3.0), hard)
    if kwargs["weights"] is None:
        single = rewards[:, :1]
        gdpo_single = advantages("gdpo", single)
        for estimator in ("gd2po_hard", "gd2po_snr"):
            assert torch.equal(advantages(estimator, single), gdpo_single)


@FAST
@given(st.data())
def test_outputs_are_finite_bounded_and_masked(data):
    rewards, groups, mask = data.draw(batches())
    estimator = data.draw(st.sampled_from(["grpo", "gdpo", "gd2po_hard", "gd2po_snr"]))
    kwargs = data.draw(options(rewards.shape[1]))
    advantages, metrics, _ = compute_advantages(estimator, rewards, groups, mask, **kwargs)
    assert advantages.dtype == torch.float32 and advantages.shape == mask.shape
    assert torch.isfinite(advantages).all()
    assert torch.all(advantages[mask == 0] == 0)
    assert all(math.isfinite(value) for value in metrics.values())
    for key in RATIO_KEYS:
        assert 0.0 <= metrics[key] <= 1.0, key
    for key in (key for key in metrics if key.startswith(("pair_conflict_ratio/", "zero_std_group_ratio/"))):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["keep_ratio"] + metrics["drop_ratio"] == 1.0
    assert (
        metrics["group_keep_ratio_min"] <= metrics["group_keep_ratio_mean"] <= metrics["group_keep_ratio_max"]
    )
    assert abs(metrics["rho_mean_in_conflict"]) <= metrics["rho_abs_mean_in_conflict"] <= 1.0
    assert metrics["drop_ratio"] <= metrics["conflict_ratio"] or kwargs["keep_rule"] == "paper"
    if estimator in ("grpo", "gdpo"):
        assert metrics["drop_ratio"] == 0.0 and metrics["keep_ratio"] == 1.0
