"""What the trainer admits from the queue (trainer.batching.GroupRules) and the staleness it reports
(one value per group)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from proto import Completion, ScoredGroup
from trainer.batching import GroupRules, build_batch


def group(group_id: str, version: int, size: int = 2, **changes) -> ScoredGroup:
    completion = Completion(token_ids=[1, 2], logprobs=[-0.1, -0.2], text="ab", finish_reason="stop")
    values = dict(
        group_id=group_id,
        prompt_id="p",
        prompt_token_ids=[5, 6],
        completions=[completion] * size,
        rewards={"a": [float(i) for i in range(size)], "b": [0.0] * size},
        policy_version=version,
        created_at=0.0,
        scored_at=0.0,
    )
    return ScoredGroup(**(values | changes))


def test_staleness_is_one_value_per_group():
    """Groups at policy versions 5 and 2 trained at version 5: the histogram observes {0, 3} (sum 3), not
    the first two rollouts' [0, 0]."""
    batch = build_batch([group("new", 5, size=4), group("old", 2, size=4)], ["a", "b"], 5, pad_id=0)
    assert batch.group_staleness() == [0, 3]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.integers(0, 9)), min_size=1, max_size=6))
def test_group_staleness_takes_each_group_once_whatever_its_size(shapes):
    groups = [group(f"g{i}", version, size=size) for i, (size, version) in enumerate(shapes)]
    batch = build_batch(groups, ["a"], 9, pad_id=0)
    assert batch.group_staleness() == [9 - version for _, version in shapes]
    # The rows of a shard (as each rank trains) still name each of their groups once.
    assert batch.select(torch.arange(batch.size - 1, -1, -1)).group_staleness() == batch.group_staleness()


RULES = GroupRules(reward_names=("a", "b"), vocab_size=10, max_positions=6)


def test_a_trainable_group_passes():
    assert RULES.violation(group("ok", 0)) is None
    empty = Completion(token_ids=[], logprobs=[], text="", finish_reason="stop")
    ok = Completion(token_ids=[3], logprobs=[-0.1], text="", finish_reason="stop")
    assert RULES.violation(group("one-empty-answer", 0, completions=[empty, ok])) is None
    assert RULES.violation(group("extra-reward", 0, rewards={"a": [0, 1], "b": [1, 1], "c": [0, 0]})) is None


def test_each_rule_names_what_is_wrong():
    missing = RULES.violation(group("m", 0, rewards={"a": [0.0, 1.0]}))
    assert missing == "rewards lack ['b']: the experiment trains on ['a', 'b'], the group has ['a']"
    assert "prompt_token_ids holds token id 10, outside the model's vocabulary of 10" in RULES.violation(
        group("v", 0, prompt_token_ids=[1, 10])
    )
    high = Completion(token_ids=[3, 12], logprobs=[-0.1, -0.1], text="", finish_reason="stop")
    ok = Completion(token_ids=[3], logprobs=[-0.1], text="", finish_reason="stop")
    assert "completions[1].token_ids holds token id 12" in RULES.violation(
        group("v", 0, completions=[ok, high])
    )
    long = Completion(token_ids=[1] * 5, logprobs=[-0.1] * 5, text="", finish_reason="length")
    assert "7 tokens, longer than the model's context of 6" in RULES.violation(
        group("l", 0, completions=[ok, long])
    )
    assert GroupRules(("a",), 10).violation(group("l", 0, completions=[ok, long])) is None  # no limit
    empty = Completion(token_ids=[], logprobs=[], text="", finish_reason="stop")
    assert RULES.violation(group("e", 0, completions=[empty, empty])) == (
        "every completion is empty: no response token to train on"
    )


def test_rules_for_a_model_take_its_smaller_vocabulary_and_its_context():
    config = LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=48, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    assert GroupRules.for_model(["a"], model) == GroupRules(("a",), 32, 48)
    model.lm_head = torch.nn.Linear(8, 30, bias=False)  # a head narrower than the embedding
    assert GroupRules.for_model(["a"], model).vocab_size == 30
