"""Tests of the PPO-clip / dual-clip policy loss (ALGORITHM.md §8) and the logits helpers."""

import math

import pytest
import torch

from trainer.loss import entropy_from_logits, policy_loss, token_logprobs_from_logits


def single_token(log_ratio: float, advantage: float, **options):
    """Loss and d loss / d logπ for one valid token with the given log ratio and advantage."""
    logprobs = torch.tensor([[log_ratio - 1.0]], requires_grad=True)
    loss, stats = policy_loss(
        logprobs, torch.tensor([[-1.0]]), torch.tensor([[advantage]]), torch.ones(1, 1), **options
    )
    loss.backward()
    return loss.item(), logprobs.grad.item(), stats


def test_unclipped_region_is_the_ratio_objective():
    loss, grad, stats = single_token(math.log(1.1), 2.0)
    assert loss == pytest.approx(-2.0 * 1.1)
    assert grad == pytest.approx(-2.0 * 1.1)  # d(−A·e^x)/dx
    assert stats["clip_frac"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.1)


@pytest.mark.parametrize(("log_ratio", "advantage"), [(math.log(1.5), 1.0), (math.log(0.5), -1.0)])
def test_clipped_region_has_zero_gradient(log_ratio, advantage):
    loss, grad, stats = single_token(log_ratio, advantage)
    bound = 1.2 if advantage > 0 else 0.8
    assert loss == pytest.approx(-advantage * bound)
    assert grad == 0.0
    assert stats["clip_frac"] == 1.0


def test_clip_bounds_are_asymmetric():
    loss, grad, _ = single_token(math.log(1.25), 1.0, clip_high=0.28)
    assert loss == pytest.approx(-1.25) and grad != 0.0
    loss, grad, _ = single_token(math.log(0.85), -1.0, clip_low=0.1)
    assert loss == pytest.approx(0.9) and grad == 0.0


def test_dual_clip_caps_negative_advantage_loss():
    loss, grad, stats = single_token(math.log(10.0), -2.0)
    assert loss == pytest.approx(3.0 * 2.0)  # −c·A instead of −A·ratio = 20
    assert grad == 0.0
    assert stats["dual_clip_frac"] == 1.0
    uncapped, grad, stats = single_token(math.log(10.0), -2.0, dual_clip=None)
    assert uncapped == pytest.approx(20.0) and grad == pytest.approx(20.0)
    assert stats["dual_clip_frac"] == 0.0
    positive, _, _ = single_token(math.log(10.0), 2.0)
    assert positive == pytest.approx(-2.0 * 1.2)  # dual clip never touches A > 0


def test_ratio_is_clamped_before_exp():
    loss, grad, stats = single_token(500.0, -1.0, dual_clip=None)
    assert loss == pytest.approx(math.exp(20.0), rel=1e-5)
    assert math.isfinite(stats["approx_kl"]) and math.isfinite(grad)


def test_token_mean_counts_zero_advantage_rollouts_in_the_denominator():
    logprobs = torch.zeros(2, 4, requires_grad=True)
    advantages = torch.tensor([[1.0] * 4, [0.0] * 4])
    loss, _ = policy_loss(logprobs, torch.zeros(2, 4), advantages, torch.ones(2, 4))
    assert loss.item() == pytest.approx(-4 / 8)


def test_aggregations_differ_on_unequal_lengths():
    logprobs = torch.zeros(2, 4, requires_grad=True)
    advantages = torch.tensor([[1.0] * 4, [-1.0] * 4])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 0]])

    def loss(agg, rows=mask):
        return policy_loss(logprobs, torch.zeros(2, 4), advantages, rows, agg=agg)[0].item()

    assert loss("token-mean") == pytest.approx((-4 + 1) / 5)
    assert loss("seq-mean-token-mean") == pytest.approx((-1 + 1) / 2)
    assert loss("seq-mean-token-sum") == pytest.approx((-4 + 1) / 2)
    equal = torch.ones(2, 4)
    assert loss("token-mean", equal) == pytest.approx(loss("seq-mean-token-mean", equal))


def test_seq_mean_ignores_empty_sequences_and_empty_batch_is_zero():
    logprobs = torch.zeros(3, 2, requires_grad=True)
    advantages = torch.tensor([[1.0, 1.0], [5.0, 5.0], [1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    loss, _ = policy_loss(logprobs, torch.zeros(3, 2), advantages, mask, agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(-1.0)
    empty, stats = policy_loss(logprobs, torch.zeros(3, 2), advantages, torch.zeros(3, 2))
    assert empty.item() == 0.0 and all(math.isfinite(value) for value in stats.values())


def test_masked_tokens_get_no_gradient():
    logprobs = torch.randn(2, 5, requires_grad=True)
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    loss, _ = policy_loss(logprobs, logprobs.detach() + 0.05, torch.randn(2, 5), mask)
    loss.backward()
    assert torch.all(logprobs.grad[mask == 0] == 0) and torch.any(logprobs.grad[mask == 1] != 0)


def test_kl_to_reference_is_k3_and_optional():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0]])
    args = (logprobs, logprobs.detach(), torch.zeros(1, 2), torch.ones(1, 2))
    loss, stats = policy_loss(*args, ref_logprobs=ref, kl_coef=0.5)
    k3 = math.exp(-0.5) + 0.5 - 1
    assert stats["kl_ref"] == pytest.approx(k3 / 2)
    assert loss.item() == pytest.approx(0.5 * k3 / 2)
    loss.backward()
    assert logprobs.grad[0, 0].item() == pytest.approx(0.5 * (1 - math.exp(-0.5)) / 2)
    assert policy_loss(*args)[1]["kl_ref"] == 0.0
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(*args, kl_coef=0.1)


def test_entropy_bonus_lowers_the_loss_and_gets_gradient():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    entropy = entropy_from_logits(logits)
    args = (torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3))
    base, _ = policy_loss(*args)
    bonus, stats = policy_loss(*args, entropy=entropy, entropy_coef=0.01)
    assert bonus.item() == pytest.approx(base.item() - 0.01 * entropy.mean().item())
    assert stats["entropy"] == pytest.approx(entropy.mean().item())
    bonus.backward()
    assert logits.grad.abs().sum() > 0


def test_approx_kl_against_old_policy():
    logprobs = torch.tensor([[0.0, 0.3]])
    _, stats = policy_loss(logprobs, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2))
    assert stats["approx_kl"] == pytest.approx((math.exp(-0.3) + 0.3 - 1) / 2)
    _, same = policy_loss(logprobs, logprobs, torch.ones(1, 2), torch.ones(1, 2))
    assert same["approx_kl"] == 0.0 and same["ratio_mean"] == 1.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"agg": "sum"}, "unknown agg"),
        ({"dual_clip": 1.0}, "dual_clip must be > 1"),
        ({"clip_low": -0.1}, "clip_low and clip_high"),
        ({"entropy_coef": 0.1}, "needs entropy"),
        ({"ref_logprobs": torch.zeros(1, 3)}, "ref_logprobs has shape"),
    ],
)
def test_invalid_arguments(options, message):
    with pytest.raises(ValueError, match=message):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), **options)


def test_token_logprobs_match_log_softmax_and_flow_gradients():
    logits = torch.randn(3, 7, 11, requires_grad=True)
    ids = torch.randint(0, 11, (3, 7))
    got = token_logprobs_from_logits(logits, ids, chunk_rows=4)
    expected = torch.log_softmax(logits, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert logits.grad.shape == logits.shape and logits.grad.abs().sum() > 0


def test_token_logprobs_upcast_bf16_logits():
    logits = (torch.randn(2, 5, 9) * 4).to(torch.bfloat16)
    ids = torch.randint(0, 9, (2, 5))
    got = token_logprobs_from_logits(logits, ids)
    assert got.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(got, expected)


def test_entropy_from_logits():
    logits = torch.randn(4, 6, 13)
    probabilities = torch.softmax(logits, dim=-1)
    expected = -(probabilities * torch.log_softmax(logits, dim=-1)).sum(dim=-1)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_rows=5), expected)
    uniform = entropy_from_logits(torch.zeros(2, 8))
    torch.testing.assert_close(uniform, torch.full((2,), math.log(8)))
    assert entropy_from_logits(torch.zeros(0, 3, 8)).shape == (0, 3)
