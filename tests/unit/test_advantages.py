"""Example-based tests of the advantage estimators: docs/algorithm.md §6 worked example and §11 edge cases."""

import math

import pytest
import torch

from trainer.algorithms import ESTIMATORS, Decision, compute_advantages, masked_whiten, register_estimator

# docs/algorithm.md §6: two prompts, G = 4, rewards (correctness, length), every L = 10.
EXAMPLE_REWARDS = torch.tensor(
    [[3, 0.2], [3, 0.8], [-3, 0.9], [-3, 0.1], [0, 0.5], [0, 0.5], [0, 0.5], [0, 0.5]], dtype=torch.float64
)
EXAMPLE_GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
EXAMPLE_MASK = torch.ones(8, 10)
# The table rounds to four digits; the eight-digit values evaluate the §2–§5 formulas in float64.
TABLE_ALL_KEPT = [0.1505, 1.8369, 0.1305, -2.118, 0, 0, 0, 0]
EXACT_ALL_KEPT = [0.15052417, 1.83693874, 0.13054491, -2.11800774, 0, 0, 0, 0]
TABLE_FILTERED = [0, 1.6334, 0, -1.7959, 0.0406, 0.0406, 0.0406, 0.0406]
EXACT_FILTERED = [0, 1.63343350, 0, -1.79591065, 0.04061929, 0.04061929, 0.04061929, 0.04061929]


def run(estimator, rewards, groups, lengths=None, *, width=None, **options):
    """compute_advantages with a mask built from per-rollout lengths (default: 10 tokens each)."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    lengths = torch.full((rewards.shape[0],), 10) if lengths is None else torch.as_tensor(lengths)
    width = int(lengths.max()) if width is None else width
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    return compute_advantages(estimator, rewards, torch.as_tensor(groups), mask, **options)


def per_rollout(advantages: torch.Tensor) -> torch.Tensor:
    """The value of each rollout's first token (every token of a rollout carries the same value)."""
    return advantages[:, 0].double()


@pytest.mark.parametrize(
    ("estimator", "options", "table", "exact"),
    [
        ("gdpo", {}, TABLE_ALL_KEPT, EXACT_ALL_KEPT),
        ("gd2po_snr", {"tau": 0.0}, TABLE_ALL_KEPT, EXACT_ALL_KEPT),
        ("gd2po_hard", {}, TABLE_FILTERED, EXACT_FILTERED),
        ("gd2po_snr", {"tau": 0.8}, TABLE_FILTERED, EXACT_FILTERED),
        ("gd2po_snr", {"tau": 1.0}, TABLE_FILTERED, EXACT_FILTERED),
    ],
)
def test_worked_example_rows(estimator, options, table, exact):
    advantages, _, _ = compute_advantages(estimator, EXAMPLE_REWARDS, EXAMPLE_GROUPS, EXAMPLE_MASK, **options)
    assert advantages.dtype == torch.float32 and advantages.shape == (8, 10)
    assert torch.equal(advantages, advantages[:, :1].expand(8, 10))
    got = per_rollout(advantages)
    torch.testing.assert_close(got, torch.tensor(exact, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, torch.tensor(table, dtype=torch.float64), atol=5e-4, rtol=0)


def test_worked_example_per_reward_advantages():
    correctness = 3 / (math.sqrt(12) + 1e-6)
    std_length = math.sqrt(0.5 / 3)
    short, long = 0.3 / (std_length + 1e-6), 0.4 / (std_length + 1e-6)
    expected = {
        0: [correctness, correctness, -correctness, -correctness, 0, 0, 0, 0],
        1: [-short, short, long, -long, 0, 0, 0, 0],
    }
    for column, values in expected.items():
        advantages, _, _ = run("gdpo", EXAMPLE_REWARDS[:, column : column + 1], EXAMPLE_GROUPS, whiten=False)
        torch.testing.assert_close(per_rollout(advantages), torch.tensor(values, dtype=torch.float64))
    assert abs(correctness - 0.866) < 5e-4 and abs(short - 0.735) < 5e-4 and abs(long - 0.980) < 5e-4


def test_worked_example_hard_metrics():
    _, metrics, _ = compute_advantages("gd2po_hard", EXAMPLE_REWARDS, EXAMPLE_GROUPS, EXAMPLE_MASK)
    expected = {
        "conflict_ratio": 0.25,
        "drop_ratio": 0.25,
        "keep_ratio": 0.75,
        "group_keep_ratio_mean": 0.75,
        "group_keep_ratio_min": 0.5,
        "group_keep_ratio_max": 1.0,
        "group_keep_ratio_std": 0.25,
        "dropped_over_conflicting": 1.0,
        "all_filtered": 0.0,
        "single_kept_token": 0.0,
        "pair_conflict_ratio/r0__r1": 0.25,
        "zero_std_group_ratio/r0": 0.5,
        "zero_std_group_ratio/r1": 0.5,
        "reward_mean/r0": 0.0,
        "reward_std/r0": math.sqrt(4.5),
        "reward_mean/r1": 0.5,
    }
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key


def test_worked_example_snr_metrics():
    _, metrics, _ = compute_advantages("gd2po_snr", EXAMPLE_REWARDS, EXAMPLE_GROUPS, EXAMPLE_MASK, tau=0.8)
    assert metrics["rho_mean_in_conflict"] == pytest.approx(0.0718, abs=5e-5)
    assert metrics["rho_mean_in_conflict"] == pytest.approx(0.07178933, abs=1e-5)
    assert metrics["rho_abs_mean_in_conflict"] == pytest.approx(0.07178933, abs=1e-5)
    assert metrics["rho_median_in_conflict"] == pytest.approx(0.0616, abs=5e-5)
    assert metrics["rho_median_in_conflict"] == pytest.approx(0.06163571, abs=1e-5)
    assert metrics["dropped_over_conflicting"] == 1.0


@pytest.mark.parametrize("estimator", ["grpo", "gdpo"])
def test_baselines_report_conflicts_but_drop_nothing(estimator):
    _, metrics, _ = compute_advantages(estimator, EXAMPLE_REWARDS, EXAMPLE_GROUPS, EXAMPLE_MASK)
    assert metrics["conflict_ratio"] == 0.25
    assert metrics["drop_ratio"] == 0.0 and metrics["keep_ratio"] == 1.0
    assert metrics["dropped_over_conflicting"] == 0.0
    assert metrics["group_keep_ratio_min"] == 1.0
    assert metrics["rho_mean_in_conflict"] == pytest.approx(0.07178933, abs=1e-5)


@pytest.mark.parametrize(
    ("estimator", "rewards", "groups", "kappa"),
    [
        # Issue 13 item 5: an idle kept group ([1,1,1,1]: all-zero advantages) is kept, not dropped.
        ("grpo", [[1.0], [1.0], [1.0], [1.0], [0.0], [1.0], [2.0]], [0, 0, 0, 0, 1, 1, 1], [1.0, 1.0]),
        ("gdpo", [[1.0], [1.0], [1.0], [1.0], [0.0], [1.0], [2.0]], [0, 0, 0, 0, 1, 1, 1], [1.0, 1.0]),
        # The worked example: Hard drops the two mixed-sign rollouts of q_a.
        ("gd2po_hard", EXAMPLE_REWARDS, EXAMPLE_GROUPS, [0.5, 1.0]),
        # A group whose every rollout conflicts: κ = 0, and it stays 0 with the filter off.
        ("gd2po_hard", [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], [7, 7, 7, 7], [0.0]),
    ],
)
def test_group_keep_is_the_estimators_kappa(estimator, rewards, groups, kappa):
    """The per-group keep ratios the trainer's histogram observes are κ, from the estimator's own
    keep decision, so they agree with group_keep_ratio_* and keep_ratio."""
    advantages, metrics, group_keep = run(estimator, rewards, groups)
    assert group_keep.tolist() == kappa
    assert metrics["group_keep_ratio_min"] == min(kappa) and metrics["group_keep_ratio_max"] == max(kappa)
    if estimator in ("grpo", "gdpo"):
        assert torch.all(advantages[:4] == 0)  # idle rows: zero rows are not what "kept" is read from


@pytest.mark.parametrize("size", [2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("value", [0.1, 0.7, 1 / 3, -2.3, 1000 / 7])
def test_identical_rewards_give_exact_zero(size, value):
    varying = torch.linspace(-1, 2, size, dtype=torch.float64)
    rewards = torch.stack([torch.full((size,), value, dtype=torch.float32).double(), varying], dim=1)
    groups = torch.zeros(size, dtype=torch.int64)
    constant_only, _, _ = run("gdpo", rewards[:, :1], groups, whiten=False)
    assert torch.all(constant_only == 0)
    grpo, _, _ = run("grpo", rewards[:, :1], groups)
    assert torch.all(grpo == 0)
    _, metrics, _ = run("gd2po_hard", rewards, groups)
    assert metrics["conflict_ratio"] == 0.0  # no false conflicts from float residuals
    assert metrics["zero_std_group_ratio/r0"] == 1.0 and metrics["zero_std_group_ratio/r1"] == 0.0


def test_float64_noise_in_weighted_sum_is_still_constant():
    rewards = torch.tensor([[0.1, 0.2], [0.3, 0.0]], dtype=torch.float64)
    assert rewards.sum(dim=1)[0] != rewards.sum(dim=1)[1]  # 0.30000000000000004 vs 0.3
    advantages, _, _ = run("grpo", rewards, [5, 5])
    assert torch.all(advantages == 0)


def test_singleton_group_uses_raw_reward():
    rewards = [[2.0, -1.0], [1.0, 1.0], [3.0, 2.0], [0.0, 4.0]]
    groups = [9, 4, 4, 4]
    advantages, metrics, _ = run("gdpo", rewards, groups, whiten=False)
    assert per_rollout(advantages)[0].item() == pytest.approx((2.0 - 1.0) / (1 + 1e-6), abs=1e-7)
    raw, _, _ = run("gdpo", rewards, groups, whiten=False, norm_by_std=False)
    assert per_rollout(raw)[0].item() == 1.0
    assert metrics["conflict_ratio"] == 0.75  # the singleton (+2, −1) mixes signs, as do (3, 2) and (0, 4)
    hard, _, _ = run("gd2po_hard", rewards, groups)
    assert torch.all(hard[0] == 0)


def test_all_rollouts_dropped_gives_zeros_without_nan():
    rewards = [[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]]
    advantages, metrics, _ = run("gd2po_hard", rewards, [0, 0, 1, 1])
    assert torch.all(advantages == 0)
    assert metrics["all_filtered"] == 1.0 and metrics["keep_ratio"] == 0.0 and metrics["drop_ratio"] == 1.0
    assert metrics["group_keep_ratio_max"] == 0.0
    assert all(math.isfinite(value) for value in metrics.values())


@pytest.mark.parametrize("estimator", ["gdpo", "gd2po_hard"])
def test_single_kept_token_gives_zeros_and_metric(estimator):
    rewards = [[1.0, 0.0], [0.0, 1.0], [3.0, 3.0], [1.0, 1.0]]
    lengths = [5, 5, 1, 0] if estimator == "gd2po_hard" else [0, 0, 1, 0]
    advantages, metrics, _ = run(estimator, rewards, [0, 0, 1, 1], lengths)
    assert torch.all(advantages == 0)
    assert metrics["single_kept_token"] == 1.0
    assert metrics["all_filtered"] == 0.0


def test_fully_dropped_group_contributes_nothing():
    conflicting = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    rewards = torch.cat([EXAMPLE_REWARDS, conflicting])
    groups = torch.cat([EXAMPLE_GROUPS, torch.full((4,), -42)])
    with_group, metrics, _ = run("gd2po_hard", rewards, groups)
    without_group, _, _ = run("gd2po_hard", EXAMPLE_REWARDS, EXAMPLE_GROUPS)
    assert torch.all(with_group[8:] == 0)
    torch.testing.assert_close(with_group[:8], without_group)
    assert metrics["group_keep_ratio_min"] == 0.0


def test_empty_responses():
    lengths = [10, 0, 10, 10, 3, 0, 7, 10]
    advantages, metrics, _ = run("gd2po_snr", EXAMPLE_REWARDS, EXAMPLE_GROUPS, lengths)
    assert torch.all(advantages[[1, 5]] == 0) and torch.isfinite(advantages).all()
    weights = (torch.arange(10)[None, :] < torch.tensor(lengths)[:, None]).float()
    assert (advantages * weights).sum().abs() < 1e-5  # whitened over the remaining kept tokens
    empty, metrics, _ = compute_advantages("gdpo", EXAMPLE_REWARDS, EXAMPLE_GROUPS, torch.zeros(8, 0))
    assert empty.shape == (8, 0) and metrics["conflict_ratio"] == 0.25


def test_tau_edges():
    def advantages(estimator, **options):
        return compute_advantages(estimator, EXAMPLE_REWARDS, EXAMPLE_GROUPS, EXAMPLE_MASK, **options)[0]

    gdpo, hard = advantages("gdpo"), advantages("gd2po_hard")
    assert torch.equal(advantages("gd2po_snr", tau=0.0), gdpo)
    assert torch.equal(advantages("gd2po_snr", tau=-3.0), gdpo)
    assert torch.equal(advantages("gd2po_snr", tau=1.0), hard)
    assert torch.equal(advantages("gd2po_snr", tau=7.5), hard)
    with pytest.raises(ValueError, match="tau"):
        advantages("gd2po_snr", tau=float("nan"))


def test_rho_equal_to_tau_is_kept():
    rewards = torch.tensor([[2.0, -1.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    groups = torch.tensor([7, 0, 0])
    _, metrics, _ = run("gd2po_snr", rewards, groups)
    rho = metrics["rho_abs_mean_in_conflict"]  # the batch has exactly one conflicting rollout
    assert metrics["conflict_ratio"] == pytest.approx(1 / 3) and rho == pytest.approx(1 / 3)
    assert run("gd2po_snr", rewards, groups, tau=rho)[1]["drop_ratio"] == 0.0
    assert run("gd2po_snr", rewards, groups, tau=math.nextafter(rho, 1.0))[1]["drop_ratio"] == pytest.approx(
        1 / 3
    )


@pytest.mark.parametrize("keep_rule", ["release", "paper"])
def test_unanimous_negative_rollout_is_kept(keep_rule):
    rewards = [[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]]
    advantages, metrics, _ = run("gd2po_snr", rewards, [3, 3, 3, 3], keep_rule=keep_rule, whiten=False)
    values = per_rollout(advantages)
    assert values[1] < 0 and values[0] > 0
    assert torch.all(values[2:] == 0)
    assert metrics["keep_ratio"] == 0.5


def test_paper_rule_drops_rollouts_without_signal():
    release, release_metrics, _ = compute_advantages(
        "gd2po_snr", EXAMPLE_REWARDS, EXAMPLE_GROUPS, EXAMPLE_MASK
    )
    paper, metrics, _ = compute_advantages(
        "gd2po_snr", EXAMPLE_REWARDS, EXAMPLE_GROUPS, EXAMPLE_MASK, keep_rule="paper"
    )
    assert release_metrics["keep_ratio"] == 0.75
    assert metrics["keep_ratio"] == 0.25  # only a2 and a4: q_b has ρ = 0
    assert torch.all(paper[4:] == 0) and torch.all(paper[[0, 2]] == 0)
    assert metrics["group_keep_ratio_min"] == 0.0
    assert not torch.equal(paper, release)
    at_zero = compute_advantages(
        "gd2po_snr", EXAMPLE_REWARDS, EXAMPLE_GROUPS, EXAMPLE_MASK, keep_rule="paper", tau=0.0
    )[1]
    assert at_zero["keep_ratio"] == 0.5  # ρ = 0 is dropped even at τ = 0
    assert (
        compute_advantages(
            "gd2po_snr", EXAMPLE_REWARDS, EXAMPLE_GROUPS, EXAMPLE_MASK, keep_rule="paper", tau=1.0
        )[1]["all_filtered"]
        == 1.0
    )


def test_single_reward_makes_every_estimator_gdpo():
    rewards = EXAMPLE_REWARDS[:, 1:]
    gdpo, _, _ = run("gdpo", rewards, EXAMPLE_GROUPS)
    for estimator in ("gd2po_hard", "gd2po_snr"):
        advantages, metrics, _ = run(estimator, rewards, EXAMPLE_GROUPS)
        assert torch.equal(advantages, gdpo)
        assert metrics["conflict_ratio"] == 0.0 and not any(key.startswith("pair_") for key in metrics)


def test_unequal_lengths_change_whitening():
    lengths = [10, 2, 10, 3, 10, 10, 10, 10]
    equal, _, _ = run("gdpo", EXAMPLE_REWARDS, EXAMPLE_GROUPS)
    unequal, _, _ = run("gdpo", EXAMPLE_REWARDS, EXAMPLE_GROUPS, lengths)
    assert not torch.allclose(per_rollout(equal), per_rollout(unequal), atol=1e-3)
    mask = (torch.arange(10)[None, :] < torch.tensor(lengths)[:, None]).double()
    tokens = unequal.double() * mask
    assert tokens.sum().abs() < 1e-5  # token-weighted mean 0
    assert (tokens.square().sum() / (mask.sum() - 1)).item() == pytest.approx(1.0, abs=1e-5)


def test_permutation_and_relabelling_change_nothing():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randint(-2, 3, (24, 3), generator=generator).double()
    groups = torch.randint(0, 6, (24,), generator=generator)
    lengths = torch.randint(0, 9, (24,), generator=generator)
    base, base_metrics, _ = run("gd2po_snr", rewards, groups, lengths, width=8)
    order = torch.randperm(24, generator=generator)
    relabelled = groups[order] * -1_000_003 + 2**40
    moved, moved_metrics, _ = run("gd2po_snr", rewards[order], relabelled, lengths[order], width=8)
    torch.testing.assert_close(moved, base[order], atol=1e-6, rtol=0)
    assert moved_metrics == pytest.approx(base_metrics, abs=1e-9)


def test_norm_by_std_false_lets_large_range_rewards_dominate_rho():
    rewards = [[1.0, 10.0], [1.0, 90.0], [0.0, 80.0], [0.0, 20.0]]
    _, normalised, _ = run("gd2po_snr", rewards, [0, 0, 0, 0])
    _, raw, _ = run("gd2po_snr", rewards, [0, 0, 0, 0], norm_by_std=False)
    assert normalised["conflict_ratio"] == raw["conflict_ratio"] == 0.5
    assert normalised["drop_ratio"] == 0.5 and normalised["rho_abs_mean_in_conflict"] < 0.2
    assert raw["drop_ratio"] == 0.0 and raw["rho_abs_mean_in_conflict"] > 0.95


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rewards_are_rejected(bad):
    rewards = EXAMPLE_REWARDS.clone()
    rewards[5, 1] = bad
    with pytest.raises(ValueError, match=r"NaN/inf.*rollout 5, reward 1"):
        compute_advantages("gd2po_snr", rewards, EXAMPLE_GROUPS, EXAMPLE_MASK)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"estimator": "ppo"}, r"unknown estimator 'ppo'; known: gd2po_hard, gd2po_snr, gdpo, grpo"),
        ({"keep_rule": "strict"}, r"unknown keep_rule 'strict'; known: paper, release"),
        ({"rewards": torch.zeros(0, 2)}, r"N == 0"),
        ({"rewards": torch.zeros(8, 0)}, r"K == 0"),
        ({"rewards": torch.zeros(8)}, r"rewards must be \[N, K\]"),
        ({"group_ids": torch.zeros(7, dtype=torch.int64)}, r"group_ids must be \[N\] = \[8\]"),
        ({"group_ids": torch.zeros(8)}, r"group_ids must be integers"),
        ({"response_mask": torch.ones(7, 10)}, r"response_mask must be \[N, T\] with N = 8"),
        ({"response_mask": torch.ones(8)}, r"response_mask must be \[N, T\]"),
        ({"weights": [1.0, 2.0, 3.0]}, r"weights must have K = 2"),
        ({"weights": [1.0, float("nan")]}, r"weights must be finite"),
        ({"whiten": "batch"}, r"whiten must be True, False or 'none'"),
        ({"reward_names": ["a"]}, r"reward_names must have K = 2"),
        ({"reward_names": ["a", "a"]}, r"reward_names must be unique"),
        ({"eps": -1.0}, r"eps must be >= 0"),
    ],
)
def test_invalid_inputs_raise_clear_errors(change, message):
    arguments = {
        "estimator": "gd2po_snr",
        "rewards": EXAMPLE_REWARDS,
        "group_ids": EXAMPLE_GROUPS,
        "response_mask": EXAMPLE_MASK,
    }
    arguments |= change
    positional = [arguments.pop(name) for name in ("estimator", "rewards", "group_ids", "response_mask")]
    with pytest.raises(ValueError, match=message):
        compute_advantages(*positional, **arguments)


def test_grpo_never_whitens_and_whiten_none_is_false():
    grpo_on = run("grpo", EXAMPLE_REWARDS, EXAMPLE_GROUPS, whiten=True)[0]
    assert torch.equal(grpo_on, run("grpo", EXAMPLE_REWARDS, EXAMPLE_GROUPS, whiten=False)[0])
    summed = EXAMPLE_REWARDS.sum(dim=1)[:4]
    expected = (summed - summed.mean()) / (summed.std() + 1e-6)
    torch.testing.assert_close(per_rollout(grpo_on)[:4], expected)
    for estimator in ("gdpo", "gd2po_snr"):
        none = run(estimator, EXAMPLE_REWARDS, EXAMPLE_GROUPS, whiten="none")[0]
        assert torch.equal(none, run(estimator, EXAMPLE_REWARDS, EXAMPLE_GROUPS, whiten=False)[0])


def test_unwhitened_gd2po_is_kappa_times_combined_advantage():
    hard, _, _ = run("gd2po_hard", EXAMPLE_REWARDS, EXAMPLE_GROUPS, whiten=False)
    combined, _, _ = run("gdpo", EXAMPLE_REWARDS, EXAMPLE_GROUPS, whiten=False)
    kappa = torch.tensor([0.5] * 4 + [1.0] * 4, dtype=torch.float64)
    keep = torch.tensor([0, 1, 0, 1, 1, 1, 1, 1], dtype=torch.float64)
    torch.testing.assert_close(per_rollout(hard), per_rollout(combined) * kappa * keep)


def test_ablation_switches():
    def advantages(**options):
        return run("gd2po_hard", EXAMPLE_REWARDS, EXAMPLE_GROUPS, whiten=False, **options)

    combined = per_rollout(run("gdpo", EXAMPLE_REWARDS, EXAMPLE_GROUPS, whiten=False)[0])
    kappa = torch.tensor([0.5] * 4 + [1.0] * 4, dtype=torch.float64)
    keep = torch.tensor([0, 1, 0, 1, 1, 1, 1, 1], dtype=torch.float64)
    torch.testing.assert_close(per_rollout(advantages(reweight=False)[0]), combined * keep)
    only_kappa, metrics, _ = advantages(filter=False)
    torch.testing.assert_close(per_rollout(only_kappa), combined * kappa)
    assert metrics["drop_ratio"] == 0.0 and metrics["group_keep_ratio_min"] == 0.5
    neither = run("gd2po_hard", EXAMPLE_REWARDS, EXAMPLE_GROUPS, filter=False, reweight=False)[0]
    assert torch.equal(neither, run("gdpo", EXAMPLE_REWARDS, EXAMPLE_GROUPS)[0])


def test_weights_scale_rewards_and_zero_weight_cannot_conflict():
    weighted, metrics, _ = run("gdpo", EXAMPLE_REWARDS, EXAMPLE_GROUPS, whiten=False, weights=[2.0, 0.0])
    single, _, _ = run("gdpo", EXAMPLE_REWARDS[:, :1], EXAMPLE_GROUPS, whiten=False)
    torch.testing.assert_close(weighted, 2 * single)
    assert metrics["conflict_ratio"] == 0.0
    _, flipped, _ = run("gd2po_hard", EXAMPLE_REWARDS, EXAMPLE_GROUPS, weights=[1.0, -1.0])
    assert flipped["conflict_ratio"] == 0.25  # a2 and a4 now mix directions instead of a1 and a3
    grpo, _, _ = run("grpo", EXAMPLE_REWARDS, EXAMPLE_GROUPS, weights=[0.0, 1.0])
    torch.testing.assert_close(grpo, run("grpo", EXAMPLE_REWARDS[:, 1:], EXAMPLE_GROUPS)[0])


def test_mask_dtypes_and_masked_tokens():
    lengths = torch.tensor([1023, 517, 1021, 1, 1000, 0, 999, 9])  # not all exact in bfloat16
    mask = torch.arange(1024)[None, :] < lengths[:, None]
    as_float, _, _ = compute_advantages("gd2po_snr", EXAMPLE_REWARDS, EXAMPLE_GROUPS, mask.float())
    for other in (mask, mask.long(), mask.double(), mask.bfloat16()):
        got, _, _ = compute_advantages("gd2po_snr", EXAMPLE_REWARDS, EXAMPLE_GROUPS, other)
        assert got.dtype == torch.float32 and torch.equal(got, as_float)
    assert torch.all(as_float[~mask] == 0)


def test_metric_names_and_pairs():
    rewards = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    _, metrics, _ = compute_advantages(
        "gd2po_snr", rewards, torch.tensor([1, 1, 1]), torch.ones(3, 2), reward_names=["acc", "fmt", "len"]
    )
    pairs = {key for key in metrics if key.startswith("pair_conflict_ratio/")}
    assert pairs == {f"pair_conflict_ratio/{pair}" for pair in ("acc__fmt", "acc__len", "fmt__len")}
    assert metrics["pair_conflict_ratio/acc__fmt"] == pytest.approx(2 / 3)  # rollouts 1 and 2
    assert {"reward_mean/len", "reward_std/acc", "zero_std_group_ratio/fmt"} <= metrics.keys()
    assert all(isinstance(value, float) for value in metrics.values())


def test_register_estimator_adds_one_function():
    @register_estimator("test_negated_gdpo")
    def negated(batch):
        keep = torch.ones_like(batch.conflict)
        group_keep = torch.ones(batch.groups.count, dtype=torch.float64)
        return Decision(scores=-batch.combined, keep=keep, group_keep=group_keep, whiten=False)

    try:
        got, _, _ = run("test_negated_gdpo", EXAMPLE_REWARDS, EXAMPLE_GROUPS)
        expected, _, _ = run("gdpo", EXAMPLE_REWARDS, EXAMPLE_GROUPS, whiten=False)
        torch.testing.assert_close(got, -expected)
        with pytest.raises(ValueError, match="already registered"):
            register_estimator("test_negated_gdpo")(negated)
    finally:
        del ESTIMATORS["test_negated_gdpo"]


def test_masked_whiten_rows_match_tokens():
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(6, generator=generator, dtype=torch.float64)
    mask = (torch.rand(6, 5, generator=generator) > 0.4).double()
    by_tokens = masked_whiten(scores[:, None].expand(6, 5), mask) * mask
    by_rows = masked_whiten(scores, mask.sum(dim=1))[:, None] * mask
    torch.testing.assert_close(by_rows, by_tokens)
    assert torch.equal(masked_whiten(scores, torch.tensor([0.0, 0, 1, 0, 0, 0])), torch.zeros(6))
