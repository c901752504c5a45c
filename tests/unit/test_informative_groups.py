"""Informative batches (``trainer.dynamic_sampling``): the per-group signal rule, its per-group
locality (what lets the trainer decide one group at a time), the config's backlog formula, and the step
record of what sampling read and cost."""

from __future__ import annotations

import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_advantage_properties import batches, options

from proto import Completion, ScoredGroup
from proto.config import ExperimentConfig
from trainer.algorithms import compute_advantages, informative_groups
from trainer.sampling import InformativeRule, read_metrics

ESTIMATORS = ["grpo", "gdpo", "gd2po_hard", "gd2po_snr"]


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_a_group_is_informative_iff_some_rollout_of_it_gets_a_nonzero_unwhitened_advantage(data):
    """Right value: the unwhitened advantages of compute_advantages itself — a group is informative
    exactly when one of its rollouts with a response token has a nonzero advantage."""
    rewards, groups, mask = data.draw(batches())
    estimator = data.draw(st.sampled_from(ESTIMATORS))
    kwargs = {**data.draw(options(rewards.shape[1])), "whiten": False}
    has_response = mask.sum(dim=1) > 0
    flags = informative_groups(estimator, rewards, groups, has_response, **kwargs)
    advantages, _, _ = compute_advantages(estimator, rewards, groups, torch.ones(len(groups), 1), **kwargs)
    moving = (advantages[:, 0] != 0) & has_response
    for position, group_id in enumerate(torch.unique(groups)):  # ascending id order, as group_keep
        assert bool(flags[position]) == bool(moving[groups == group_id].any())


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_the_decision_for_a_group_does_not_depend_on_the_rest_of_the_batch(data):
    """The trainer decides group by group as groups arrive: each group alone gets the batch's verdict."""
    rewards, groups, mask = data.draw(batches())
    estimator = data.draw(st.sampled_from(ESTIMATORS))
    kwargs = data.draw(options(rewards.shape[1]))
    has_response = mask.sum(dim=1) > 0
    together = informative_groups(estimator, rewards, groups, has_response, **kwargs)
    for position, group_id in enumerate(torch.unique(groups)):
        rows = groups == group_id
        alone = informative_groups(estimator, rewards[rows], groups[rows], has_response[rows], **kwargs)
        assert bool(alone[0]) == bool(together[position])


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_equal_rewards_carry_no_signal_and_differing_ones_do(estimator: str) -> None:
    flat = torch.tensor([[1.0, 0.0]] * 4)
    varied = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    ids, response = torch.zeros(4, dtype=torch.int64), torch.ones(4, dtype=torch.bool)
    assert not informative_groups(estimator, flat, ids, response)[0]
    assert informative_groups(estimator, varied, ids, response)[0]
    assert not informative_groups(estimator, varied, ids, torch.zeros(4, dtype=torch.bool))[0]


def test_gd2po_keeping_none_of_a_group_makes_it_uninformative_where_gdpo_trains_on_it() -> None:
    """Every rollout conflicting (one reward up where the other is down): GD²PO-Hard drops all (κ = 0),
    GDPO's combined advantage is nonzero on none either way here, GD²PO-SNR at τ 0 keeps them."""
    rewards = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 2.0]])
    ids, response = torch.zeros(4, dtype=torch.int64), torch.ones(4, dtype=torch.bool)
    assert not informative_groups("gd2po_hard", rewards, ids, response)[0]
    assert informative_groups("gd2po_hard", rewards, ids, response, filter=False, reweight=False)[0]
    assert not informative_groups("gd2po_hard", rewards, ids, response, filter=False)[0]  # κ = 0 scales to 0


def config(**trainer) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "rewards": [
                {"name": "a", "url": "http://127.0.0.1:1"},
                {"name": "b", "url": "http://127.0.0.1:2"},
            ],
            "trainer": trainer,
            "rollout": {"max_backlog": 64},
        }
    )


def test_the_backlog_bound_is_clamped_between_a_steps_reads_and_what_stays_fresh() -> None:
    assert config().backlog_bound == 64  # off: max_backlog as set
    on = config(prompts_per_step=8, max_staleness=3, dynamic_sampling={"oversample": 1.5})
    assert on.backlog_limits() == (12, 24) and on.backlog_bound == 24
    low = config(prompts_per_step=8, max_staleness=3, dynamic_sampling={"oversample": 2.5})
    assert low.backlog_limits() == (20, 24)
    small = ExperimentConfig.model_validate(
        {**low.model_dump(mode="json", exclude={"auth"}), "rollout": {"max_backlog": 4}}
    )
    assert small.backlog_bound == 20  # raised to a step's most reads


def test_an_oversample_the_staleness_bound_cannot_hold_is_refused_naming_the_keys() -> None:
    with pytest.raises(ValueError, match=r"oversample 3.0 reads up to 24 groups.*max_staleness.*16"):
        config(prompts_per_step=8, max_staleness=2, dynamic_sampling={"oversample": 3.0})
    # A synchronous run has no backlog to bound: accepted.
    ExperimentConfig.model_validate(
        {
            "synchronous": True,
            "trainer": {"prompts_per_step": 8, "max_staleness": 0, "dynamic_sampling": {"oversample": 4}},
        }
    )


def group(group_id: str, a: list[float], b: list[float], seconds: float | None = None) -> ScoredGroup:
    completion = Completion(token_ids=[1], logprobs=[-0.5], text="x", finish_reason="stop")
    return ScoredGroup(
        group_id=group_id,
        prompt_id="p",
        prompt_token_ids=[5],
        completions=[completion] * len(a),
        rewards={"a": a, "b": b},
        policy_version=0,
        created_at=time.time(),
        scored_at=time.time(),
        metadata={} if seconds is None else {"generation_seconds": seconds},
    )


def test_the_step_record_counts_what_was_read_and_what_the_skipped_groups_cost() -> None:
    trained = [group("t1", [0.0, 1.0], [1.0, 1.0], 2.0), group("t2", [1.0, 1.0], [0.0, 0.0], 2.0)]
    skipped = [group("s1", [1.0, 1.0], [1.0, 1.0], 1.5), group("s2", [0.0, 0.0], [0.0, 0.0])]
    record = read_metrics(trained, skipped, informative_trained=1, reward_names=["a", "b"])
    assert record["groups_read"] == 4 and record["groups_read_per_trained"] == 2.0
    assert record["informative_groups"] == 1 and record["informative_ratio"] == 0.25
    assert record["reward_informative_ratio/a"] == 0.25 and record["reward_informative_ratio/b"] == 0.0
    assert record["sampled_reward_mean/a"] == pytest.approx(5 / 8)  # skipped rollouts count
    assert record["sampled_reward_mean/b"] == pytest.approx(4 / 8)
    assert record["skipped_generation_seconds"] == 1.5  # s2 carries no time: 0, never a guess
    assert all(math.isfinite(v) for v in record.values())


def test_the_rule_follows_the_adaptive_controllers_tau() -> None:
    """One rollout conflicting with |ρ| = 1/3: kept at τ 0, dropped at τ 1 under the release rule."""
    experiment = config(advantage={"estimator": "gd2po_snr", "tau": 0.5})
    conflicting = group("c", [1.0, 0.0, 0.0], [0.0, 0.5, 0.5])
    tau = [0.0]
    rule = InformativeRule(experiment, tau=lambda: tau[0])
    assert rule(conflicting)
    tau[0] = 1.0
    assert not rule(conflicting)


def test_the_read_bound_rounds_up_without_float_noise() -> None:
    """1.1 × 50 is 55.000000000000007 in binary: the bound is 55 groups, not 56."""
    from proto.config import DynamicSamplingConfig

    assert DynamicSamplingConfig(oversample=1.1).read_limit(50) == 55
    assert DynamicSamplingConfig(oversample=2.2).read_limit(25) == 55
    assert DynamicSamplingConfig(oversample=1.5).read_limit(3) == 5  # a real fraction still rounds up
