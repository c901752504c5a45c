"""Rollout replicas on a real Redis: claims from the shared prompt cursor never overlap, even from
threads racing each other, and a replica with another prompt order is refused at start, naming the keys
that must agree."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from proto.keys import RedisKeys
from rollout_service.producer import Producer, PromptOrderMismatch

KEYS = RedisKeys("cursor-test")


def test_racing_claims_take_disjoint_positions(redis_url: str) -> None:
    producers = [Producer(redis.Redis.from_url(redis_url), KEYS) for _ in range(4)]

    def claim(i: int) -> list[int]:
        start = producers[i % 4].claim_prompts(3)
        return list(range(start, start + 3))

    with ThreadPoolExecutor(8) as pool:
        positions = [p for batch in pool.map(claim, range(200)) for p in batch]
    assert sorted(positions) == list(range(600))


def test_a_replica_with_another_prompt_order_is_refused(redis_url: str) -> None:
    first, second = (Producer(redis.Redis.from_url(redis_url), KEYS) for _ in range(2))
    first.agree_on_prompt_order("sha256:aaaa")
    second.agree_on_prompt_order("sha256:aaaa")  # the same order: a second replica, or a restart
    with pytest.raises(PromptOrderMismatch, match="data.train_files, data.shuffle_seed") as refused:
        second.agree_on_prompt_order("sha256:bbbb")
    assert KEYS.prompt_order in str(refused.value) and "redis.namespace" in str(refused.value)
    # Another namespace is another experiment: its own order.
    Producer(redis.Redis.from_url(redis_url), RedisKeys("other")).agree_on_prompt_order("sha256:bbbb")
