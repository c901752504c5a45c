"""Informative batches (``trainer.dynamic_sampling``; an extension beyond the paper).

The release masks conflicting rollouts and never resamples, so a step whose groups carry no signal —
every reward equal within a group, or GD²PO keeping none of it — trains on fewer rollouts than configured.
DAPO's dynamic sampling (verl's ``filter_groups``) keeps reading until the batch is full of groups with
signal, for one scalar reward. Here "signal" is the estimator's own: a group is informative when some
rollout it keeps has a nonzero score (:func:`trainer.algorithms.informative_groups`), so the same rule
covers zero variance in every reward, κ = 0 under the conflict filter, and GRPO's constant weighted sum.

The consumer (:meth:`trainer.consumer.GroupConsumer.pull`) reads up to :attr:`StepSampling.read_limit`
groups a step, trains the informative ones first and acknowledges the rest as skipped (``<ns>:skipped``),
or fills the step with them when the bound comes first. :func:`read_metrics` reports what it cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import redis
import torch

from proto import ScoredGroup
from proto.config import ExperimentConfig
from proto.keys import RedisKeys
from proto.messages import GENERATION_SECONDS
from proto.stream import produced_count, want_more_groups
from trainer.algorithms import informative_groups
from trainer.algorithms.grouping import group_normalize, make_groups
from trainer.consumer import StepSampling
from trainer.step import estimator_options


def group_rewards(group: ScoredGroup, reward_names: Sequence[str]) -> torch.Tensor:
    """[G, K] float64 rewards of one group, columns in ``reward_names`` order."""
    return torch.tensor(
        [[group.rewards[name][i] for name in reward_names] for i in range(group.group_size)],
        dtype=torch.float64,
    )


class InformativeRule:
    """Whether a group carries signal under the experiment's estimator and options, at the τ
    ``tau()`` returns (the adaptive controller's current τ, or None for the configured one)."""

    def __init__(self, config: ExperimentConfig, tau: Callable[[], float | None] = lambda: None):
        self.config, self.tau = config, tau

    def __call__(self, group: ScoredGroup) -> bool:
        rewards = group_rewards(group, self.config.reward_names)
        has_response = torch.tensor([bool(c.token_ids) for c in group.completions])
        flags = informative_groups(
            self.config.trainer.advantage.estimator,
            rewards,
            torch.zeros(len(has_response), dtype=torch.int64),
            has_response,
            **estimator_options(self.config, self.tau()),
        )
        return bool(flags[0])


class MoreGroups:
    """A synchronous trainer's requests for more groups (proto.stream.want_more_groups): the
    ``produced`` counter is read before each read of the stream, and a read that comes back empty asks
    for the missing groups at the trainer's current version with that snapshot. Needed with dynamic
    sampling (groups without signal were skipped) and without it: groups dead-lettered on the way, or a
    publish that failed, so no new version will make the rollout generate."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, policy_version: Callable[[], int]):
        self.client, self.keys, self.policy_version = client, keys, policy_version
        self.produced = 0

    def before_read(self) -> None:
        self.produced = produced_count(self.client, self.keys)

    def __call__(self, groups_read: int, groups_wanted: int) -> None:
        want_more_groups(self.client, self.keys, self.policy_version(), self.produced, groups_wanted)


def step_sampling(config: ExperimentConfig, rule: Callable[[ScoredGroup], bool]) -> StepSampling | None:
    """The step's sampling under ``trainer.dynamic_sampling`` (None when it is off)."""
    sampling = config.trainer.dynamic_sampling
    if sampling is None:
        return None
    return StepSampling(informative=rule, read_limit=sampling.read_limit(config.trainer.prompts_per_step))


def read_metrics(
    trained: Sequence[ScoredGroup],
    skipped: Sequence[ScoredGroup],
    informative_trained: int,
    reward_names: Sequence[str],
) -> dict[str, float]:
    """What one step's dynamic sampling read and what it cost, as metrics.jsonl keys:

    - ``groups_read`` (trained + skipped) and ``groups_read_per_trained``;
    - ``informative_groups``: trained groups that carry signal (below ``groups`` when the read bound
      filled the step with groups without signal) and ``informative_ratio`` = informative / read;
    - ``reward_informative_ratio/<reward>``: read groups whose rewards in that dimension are not all equal;
    - ``sampled_reward_mean/<reward>``: the mean reward over every rollout read, skipped ones included
      (``reward_mean/<reward>`` is over the trained batch, biased toward groups with signal);
    - ``skipped_generation_seconds``: what the skipped groups took to generate (metadata
      ``proto.messages.GENERATION_SECONDS``; 0 for groups without it).
    """
    read = [*trained, *skipped]
    rewards = torch.cat([group_rewards(g, reward_names) for g in read])
    ids = torch.tensor([index for index, g in enumerate(read) for _ in range(g.group_size)])
    _, constant = group_normalize(rewards, make_groups(ids), norm_by_std=False)
    record = {
        "groups_read": float(len(read)),
        "groups_read_per_trained": len(read) / max(len(trained), 1),
        "informative_groups": float(informative_trained),
        "informative_ratio": informative_trained / len(read),
        "skipped_generation_seconds": sum(_generation_seconds(g) for g in skipped),
    }
    for k, name in enumerate(reward_names):
        record[f"reward_informative_ratio/{name}"] = 1.0 - float(constant[:, k].to(torch.float64).mean())
        record[f"sampled_reward_mean/{name}"] = float(rewards[:, k].mean())
    return record


def _generation_seconds(group: ScoredGroup) -> float:
    value = group.metadata.get(GENERATION_SECONDS)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) and value >= 0 else 0.0
