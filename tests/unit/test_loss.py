"""Tests of the PPO-clip / dual-clip policy loss (docs/algorithm.md §8) and the logits helpers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


def _entropy_and_gradient(logits: torch.Tensor, fn) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.clone().requires_grad_(True)
    value = fn(leaf)
    value.sum().backward()
    return value.detach(), leaf.grad


def _categorical(logits: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Categorical(logits=logits).entropy()


def test_entropy_of_a_masked_token_is_zero_not_nan():
    """A −inf logit (a masked token) has probability 0 and adds nothing: [0, −inf] has entropy 0 and
    [0, 0, −inf] ln 2 = 0.693147, with finite gradients, as torch.distributions.Categorical."""
    value, gradient = _entropy_and_gradient(torch.tensor([[0.0, -math.inf]]), entropy_from_logits)
    assert value.tolist() == [0.0] and torch.isfinite(gradient).all()
    value, gradient = _entropy_and_gradient(torch.tensor([[0.0, 0.0, -math.inf]]), entropy_from_logits)
    assert value.item() == pytest.approx(0.693147, abs=1e-6) and torch.isfinite(gradient).all()
    assert torch.equal(gradient, torch.zeros(1, 3))  # the uniform pair is the maximum: gradient 0


@settings(max_examples=80, deadline=None)
@given(
    rows=st.integers(1, 6),
    vocab=st.integers(1, 9),
    scale=st.sampled_from([1.0, 30.0, 1e4]),
    chunk_rows=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_entropy_matches_categorical_with_masked_tokens(rows, vocab, scale, chunk_rows, seed):
    """Any logits, large ones and −inf ones included (each row keeps one finite logit): value and gradient
    equal torch.distributions.Categorical's, and both are finite."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator) * scale
    masked = torch.rand(rows, vocab, generator=generator) < 0.4
    masked[torch.arange(rows), torch.randint(0, vocab, (rows,), generator=generator)] = False
    logits = logits.masked_fill(masked, -math.inf)
    value, gradient = _entropy_and_gradient(logits, lambda x: entropy_from_logits(x, chunk_rows=chunk_rows))
    expected, expected_gradient = _entropy_and_gradient(logits, _categorical)
    assert torch.isfinite(value).all() and torch.isfinite(gradient).all()
    torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gradient, expected_gradient, atol=1e-5, rtol=1e-5)


def test_the_loss_stays_finite_with_masked_tokens_sampled_or_not():
    """−inf logits reach the loss through the entropy bonus and through the log-prob of a token the
    policy now masks (sampled before): log π = −inf is a true value, the clamped ratio and KL keep the
    loss and every gradient finite."""
    logits = torch.tensor([[[0.0, -math.inf, 1.0], [0.5, 0.0, -math.inf]]], requires_grad=True)
    logprobs = token_logprobs_from_logits(logits, torch.tensor([[1, 0]]))
    assert logprobs[0, 0] == -math.inf
    loss, stats = policy_loss(
        logprobs,
        torch.full((1, 2), -1.0),
        torch.ones(1, 2),
        torch.ones(1, 2),
        ref_logprobs=torch.full((1, 2), -1.0),
        kl_coef=0.1,
        entropy=entropy_from_logits(logits),
        entropy_coef=0.01,
    )
    loss.backward()
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in stats.values())
    assert torch.isfinite(logits.grad).all()
