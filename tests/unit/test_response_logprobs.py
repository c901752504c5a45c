"""The trainer's log-probs run the LM head only from the first response position: same values and the
same gradients as the full-sequence computation wherever a loss can look."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.engine import response_logprobs, shares_one_prompt
from trainer.loss import entropy_from_logits, token_logprobs_from_logits


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).float()


def _batch(prompt_lengths: list[int], answer_lengths: list[int], seed: int = 1):
    """Right-padded prompt + answer rows and their response mask over target positions."""
    generator = torch.Generator().manual_seed(seed)
    length = max(p + a for p, a in zip(prompt_lengths, answer_lengths, strict=True))
    ids = torch.randint(1, 97, (len(prompt_lengths), length), generator=generator)
    attention = torch.zeros_like(ids)
    response = torch.zeros(len(prompt_lengths), length - 1)
    for row, (prompt, answer) in enumerate(zip(prompt_lengths, answer_lengths, strict=True)):
        attention[row, : prompt + answer] = 1
        ids[row, prompt + answer :] = 0
        response[row, prompt - 1 : prompt - 1 + answer] = 1.0
    return ids, attention, response


def _full(model, ids, attention):
    logits = model(input_ids=ids, attention_mask=attention).logits
    return token_logprobs_from_logits(logits[:, :-1].float(), ids[:, 1:])


@pytest.mark.parametrize(("prompts", "answers"), [([9, 5, 12], [4, 7, 3]), ([1], [6]), ([20, 20], [1, 2])])
def test_values_and_gradients_match_the_full_sequence_on_response_positions(model, prompts, answers) -> None:
    ids, attention, response = _batch(prompts, answers)
    partial, entropy = response_logprobs(model, ids, attention, response, entropy=True)
    assert partial.shape == entropy.shape == response.shape
    first = min(prompts) - 1
    assert torch.count_nonzero(partial[:, :first]) == 0  # nothing computed before the first target

    full = _full(model, ids, attention)
    assert torch.allclose(partial * response, full * response, atol=1e-6)
    full_entropy = entropy_from_logits(model(input_ids=ids, attention_mask=attention).logits[:, :-1])
    assert torch.allclose(entropy * response, full_entropy * response, atol=1e-5)

    advantages = torch.linspace(-1.0, 1.0, response.numel()).reshape(response.shape)
    model.zero_grad()
    (partial * response * advantages).sum().backward()
    partial_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (_full(model, ids, attention) * response * advantages).sum().backward()
    for got, expected in zip(partial_grads, (p.grad for p in model.parameters()), strict=True):
        assert torch.allclose(got, expected, atol=1e-6)


def test_a_batch_without_response_tokens_gives_zeros(model) -> None:
    ids, attention, response = _batch([6, 4], [2, 3])
    result, entropy = response_logprobs(model, ids, attention, torch.zeros_like(response))
    assert entropy is None
    assert result.shape == response.shape and torch.count_nonzero(result) == 0


def test_logprobs_entropy_and_gradients_are_of_the_policy_at_the_sampling_temperature(model) -> None:
    """π_T = softmax(logits / T), as the release's actor computes it (logits ÷ rollout temperature)."""
    ids, attention, response = _batch([7, 5], [4, 6])
    temperature = 0.7
    partial, entropy = response_logprobs(
        model, ids, attention, response, temperature=temperature, entropy=True
    )
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float() / temperature
    expected = token_logprobs_from_logits(logits, ids[:, 1:])
    assert torch.allclose(partial * response, expected * response, atol=1e-6)
    assert torch.allclose(entropy * response, entropy_from_logits(logits) * response, atol=1e-5)
    assert not torch.allclose(partial * response, _full(model, ids, attention) * response, atol=1e-2)

    model.zero_grad()
    (partial * response).sum().backward()
    partial_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    scaled = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float() / temperature
    (token_logprobs_from_logits(scaled, ids[:, 1:]) * response).sum().backward()
    for got, want in zip(partial_grads, (p.grad for p in model.parameters()), strict=True):
        assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_a_temperature_that_is_not_positive_is_refused(model, temperature: float) -> None:
    ids, attention, response = _batch([3], [2])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        response_logprobs(model, ids, attention, response, temperature=temperature)


def _group(prompt_length: int, answer_lengths: list[int], seed: int = 3):
    """The G rollouts of one group: the same prompt tokens, different right-padded answers."""
    ids, attention, response = _batch([prompt_length] * len(answer_lengths), answer_lengths, seed)
    ids[:, :prompt_length] = ids[0, :prompt_length]
    return ids, attention, response


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_group_sharing_its_prompt_computes_it_once_with_the_same_values_and_gradients(
    model, temperature: float
) -> None:
    ids, attention, response = _group(11, [4, 7, 1, 5])
    assert shares_one_prompt(ids, attention, 10)
    calls = []
    handle = model.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    shared, entropy = response_logprobs(
        model, ids, attention, response, temperature=temperature, entropy=True, share_prompt=True
    )
    handle.remove()
    assert calls == [torch.Size([1, 11]), torch.Size([4, ids.shape[1] - 11])]  # the prompt once

    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float() / temperature
    expected = token_logprobs_from_logits(logits, ids[:, 1:])
    assert torch.allclose(shared * response, expected * response, atol=1e-5)
    assert torch.allclose(entropy * response, entropy_from_logits(logits) * response, atol=1e-4)

    advantages = torch.linspace(-1.0, 1.0, response.numel()).reshape(response.shape)
    model.zero_grad()
    (shared * response * advantages).sum().backward()
    shared_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    scaled = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float() / temperature
    (token_logprobs_from_logits(scaled, ids[:, 1:]) * response * advantages).sum().backward()
    for got, want in zip(shared_grads, (p.grad for p in model.parameters()), strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_rows_with_different_prompts_are_not_taken_for_a_group() -> None:
    ids, attention, _ = _group(6, [2, 3])
    assert shares_one_prompt(ids, attention, 5)
    other = ids.clone()
    other[1, 2] = (other[1, 2] + 1) % 97
    assert not shares_one_prompt(other, attention, 5)
    assert not shares_one_prompt(ids[:1], attention[:1], 5)  # one row: nothing to share
    padded = attention.clone()
    padded[1, 0] = 0
    assert not shares_one_prompt(ids, padded, 5)


def test_the_shared_path_is_taken_only_when_the_caller_asks(model) -> None:
    ids, attention, response = _group(8, [3, 2])
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    response_logprobs(model, ids, attention, response)
    handle.remove()
    assert len(calls) == 1  # one full forward: the data alone never changes the number of forwards


def test_gradient_checkpointing_falls_back_to_full_forwards(model) -> None:
    ids, attention, response = _group(8, [3, 2])
    model.gradient_checkpointing_enable()
    model.train()
    try:
        checkpointed, _ = response_logprobs(model, ids, attention, response, share_prompt=True)
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    expected = _full(model, ids, attention)
    assert torch.allclose(checkpointed * response, expected * response, atol=1e-5)
