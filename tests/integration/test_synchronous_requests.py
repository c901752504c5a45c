"""The synchronous rollout's side, against a real Redis: when it generates (``RolloutLoop._may_generate``)
given the trainer's announcements, its offers (``transport: broadcast``) and its requests for more groups
(proto.stream.want_more_groups), with and without dynamic sampling. The whole loop runs in
tests/e2e/test_dynamic_sampling.py and tests/e2e/test_synchronous_broadcast.py; here each transition is
checked, including the one that deadlocked a review's simulation: a served batch that was dead-lettered
whole must not leave the trainer's next request looking served."""

from __future__ import annotations

import time

import pytest
import redis

from proto import PolicyAnnouncement, WeightOffer, encode
from proto.config import ExperimentConfig
from proto.keys import RedisKeys
from proto.stream import want_more_groups
from rollout_service.loop import RolloutLoop
from rollout_service.metrics import RolloutMetrics
from rollout_service.producer import Producer
from rollout_service.weights import PolicyFollower

pytestmark = pytest.mark.integration
KEYS = RedisKeys("sync-requests")
PER_BATCH = 8


def produced(client: redis.Redis) -> int:
    return int(client.get(KEYS.produced) or 0)


def announce(client: redis.Redis, version: int) -> None:
    announcement = PolicyAnnouncement(
        version=version, path="/w", digest="blake3:" + "0" * 64, step=version, created_at=time.time()
    )
    client.set(KEYS.policy, encode(announcement))


def offer(client: redis.Redis, version: int) -> None:
    """The broadcast transport's offer of ``version`` (no folder announced for it)."""
    offered = WeightOffer(
        version=version,
        digest="blake3:" + "0" * 64,
        step=version,
        host="127.0.0.1",
        port=1,
        created_at=time.time(),
    )
    client.set(KEYS.weights_offer, encode(offered))


@pytest.fixture(params=["dynamic sampling", "plain"])
def loop(request, redis_url: str) -> tuple[RolloutLoop, redis.Redis]:
    """A synchronous rollout that generated its batch of version 3, with and without dynamic sampling:
    requests for more groups are served alike (the trainer may be short for other reasons)."""
    client = redis.Redis.from_url(redis_url)
    trainer = {"prompts_per_step": PER_BATCH}
    if request.param == "dynamic sampling":
        trainer["dynamic_sampling"] = {"oversample": 2}
    config = ExperimentConfig.model_validate(
        {"synchronous": True, "rollout": {"prompts_per_batch": PER_BATCH}, "trainer": trainer}
    )
    metrics = RolloutMetrics()
    follower = PolicyFollower(None, client, KEYS, metrics)
    rollout = RolloutLoop(config, None, None, None, Producer(client, KEYS), follower, metrics, "r")
    rollout.batches, rollout.last_version = 1, 3  # it generated its batch of version 3
    client.incrby(KEYS.produced, PER_BATCH)
    announce(client, 3)
    return rollout, client


def test_requests_are_served_once_while_nothing_else_was_produced(loop) -> None:
    rollout, client = loop
    assert not rollout._may_generate(0)  # caught up, no new version, no request: wait
    want_more_groups(client, KEYS, policy_version=3, produced=produced(client), groups=3)
    assert not rollout._may_generate(1)  # the trainer has not read everything yet
    assert rollout._may_generate(0) and rollout.batch_prompts == 3  # exactly the groups wanted
    assert not rollout._may_generate(0)  # the same request again (repeated while waiting): no-op
    # The served batch's 3 groups were all dead-lettered (a reward failed): the trainer asks again.
    client.incrby(KEYS.produced, 3)
    want_more_groups(client, KEYS, policy_version=3, produced=produced(client), groups=3)
    assert rollout._may_generate(0) and rollout.batch_prompts == 3


def test_a_request_made_before_the_new_versions_batch_never_doubles_it(loop) -> None:
    rollout, client = loop
    announce(client, 4)
    want_more_groups(
        client, KEYS, policy_version=4, produced=produced(client), groups=PER_BATCH
    )  # the trainer asked first
    assert rollout._may_generate(0) and rollout.batch_prompts == PER_BATCH  # the new version's batch
    rollout.last_version = 4
    client.incrby(KEYS.produced, PER_BATCH)  # ... produced
    assert not rollout._may_generate(0)  # the early request is stale now


def test_requests_of_another_version_are_ignored(loop) -> None:
    rollout, client = loop
    want_more_groups(client, KEYS, policy_version=2, produced=produced(client), groups=2)
    assert not rollout._may_generate(0)


def test_a_request_is_not_served_while_groups_it_did_not_count_wait(loop) -> None:
    """The trainer snapshots ``produced`` before its read; a batch landing between that read and its
    request is unread, and the request made with the older count must not add another batch."""
    rollout, client = loop
    before_read = produced(client)
    client.incrby(KEYS.produced, 3)  # a served batch lands right after the trainer's empty read
    want_more_groups(client, KEYS, policy_version=3, produced=before_read, groups=3)
    assert not rollout._may_generate(0)  # even once the trainer has read them (lag 0)


def test_a_version_only_offered_over_a_process_group_is_a_new_version(loop) -> None:
    """``transport: broadcast`` announces a folder every ``disk_every`` versions only: the rollout must not
    wait for the next folder (the trainer waits for groups meanwhile: a deadlock)."""
    rollout, client = loop
    assert not rollout._may_generate(0)
    offer(client, 4)
    assert rollout._may_generate(0) and rollout.batch_prompts == PER_BATCH


def test_a_rollout_that_could_not_receive_the_offered_version_does_not_sample_off_policy(loop) -> None:
    """Its transfer of version 4 failed (it serves 3): the new version makes it sync — try the transfer
    again — but it generates nothing until it serves 4, so the trainer at 4 never gets groups of 3."""
    rollout, client = loop
    rollout.policy.version = 3
    offer(client, 4)
    assert rollout._may_generate(0) and rollout._behind_the_offer()
    rollout.policy.version = 4  # received at a later try
    assert not rollout._behind_the_offer()


def test_a_trainer_whose_publish_failed_gets_its_next_batch_at_the_same_version(loop) -> None:
    """No new version comes after a failed publish: the trainer, short a whole step at version 3, asks."""
    rollout, client = loop
    assert not rollout._may_generate(0)
    want_more_groups(client, KEYS, policy_version=3, produced=produced(client), groups=PER_BATCH)
    assert rollout._may_generate(0) and rollout.batch_prompts == PER_BATCH
