"""Reward fan-out against real HTTP servers: a reward that is down and then recovers costs retries, not
zeros; one that keeps failing dead-letters the group with the reason; 4xx is not retried; replicas
share the load."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from live_server import serve

from proto import Completion, DeadLetter, PromptRecord, ScoredGroup, ScoreItem, decode
from proto.config import ExperimentConfig, RetryConfig, RewardEndpoint
from proto.keys import RedisKeys
from proto.stream import entry_message
from rollout_service.loop import RolloutLoop
from rollout_service.metrics import RolloutMetrics
from rollout_service.producer import Producer
from rollout_service.rewards_client import RewardClient, RewardFailure

pytestmark = pytest.mark.integration
FAST_RETRY = RetryConfig(attempts=4, backoff_initial=0.01, backoff_max=0.05, jitter=0.01)


def scripted_reward(statuses: list[int]) -> tuple[FastAPI, list[int]]:
    """A real reward service answering the scripted status codes in turn, then 200 with score = len(text)."""
    app, calls = FastAPI(), []

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/v1/score")
    async def score(request: Request):
        body = await request.json()
        calls.append(len(body["items"]))
        code = statuses[len(calls) - 1] if len(calls) <= len(statuses) else 200
        if code != 200:
            return JSONResponse({"detail": "scripted failure"}, status_code=code)
        results = [
            {"id": i["id"], "score": float(len(i["completion"])), "status": "ok"} for i in body["items"]
        ]
        return {"reward": "r", "version": "1", "results": results}

    return app, calls


def items(n: int = 3) -> list[ScoreItem]:
    return [ScoreItem(id=str(i), prompt="p", completion="x" * (i + 1)) for i in range(n)]


def client_for(urls: list[str], metrics: RolloutMetrics) -> RewardClient:
    return RewardClient([RewardEndpoint(name="r", url=urls, timeout=5)], FAST_RETRY, metrics)


def retries(metrics: RolloutMetrics) -> float:
    return sum(
        s.value
        for f in metrics.registry.collect()
        if f.name == "gd2po_rollout_reward_retries"
        for s in f.samples
        if s.name.endswith("_total")
    )


async def _score(client: RewardClient, batch: list[ScoreItem]):
    try:
        return await client.score(batch)
    finally:
        await client.close()


def test_down_then_up_is_retried_not_zeroed() -> None:
    app, calls = scripted_reward([503, 429])
    metrics = RolloutMetrics()
    with serve(app) as url:
        scores = asyncio.run(_score(client_for([url], metrics), items()))
    assert scores == {"r": [1.0, 2.0, 3.0]}
    assert len(calls) == 3 and retries(metrics) == 2


def test_connection_refused_moves_to_the_next_replica() -> None:
    app, calls = scripted_reward([])
    metrics = RolloutMetrics()
    with serve(app) as url:
        dead = "http://127.0.0.1:9"  # nothing listens on the discard port
        scores = asyncio.run(_score(client_for([dead, url], metrics), items()))
    assert scores["r"] == [1.0, 2.0, 3.0] and len(calls) == 1


def test_persistent_failure_raises_and_4xx_is_not_retried() -> None:
    always, calls = scripted_reward([500] * 10)
    bad_request, bad_calls = scripted_reward([400] * 10)
    with serve(always) as url, serve(bad_request) as bad_url:
        with pytest.raises(RewardFailure, match="failed after 4 attempts"):
            asyncio.run(_score(client_for([url], RolloutMetrics()), items()))
        with pytest.raises(RewardFailure, match="HTTP 400"):
            asyncio.run(_score(client_for([bad_url], RolloutMetrics()), items()))
    assert len(calls) == 4 and len(bad_calls) == 1


class _NoEngine:
    """The dead-letter path needs no generation: completions are given."""


def test_failed_group_is_dead_lettered_with_the_reason(redis_url: str) -> None:
    failing, _ = scripted_reward([500] * 100)
    working, _ = scripted_reward([])
    client = redis.Redis.from_url(redis_url)
    keys = RedisKeys()
    with serve(failing) as bad, serve(working) as good:
        config = ExperimentConfig(
            rewards=[{"name": "good", "url": good}, {"name": "bad", "url": bad}],
            rollout={"retry": FAST_RETRY.model_dump(), "group_size": 2},
        )
        metrics = RolloutMetrics()
        loop = RolloutLoop(
            config,
            engine=_NoEngine(),
            prompts=None,
            rewards=RewardClient(config.rewards, FAST_RETRY, metrics),
            producer=Producer(client, keys),
            policy=None,
            metrics=metrics,
            producer_id="t",
        )
        record = PromptRecord(prompt_id="p0", messages=[{"role": "user", "content": "q"}], label="gt")
        group = [Completion(token_ids=[1], logprobs=[-0.5], text="a", finish_reason="stop")] * 2
        asyncio.run(loop._score_and_publish([record], [[5, 6]], [group], 3, time.time(), 0.5))
    assert client.xlen(keys.groups) == 0  # no group with a fabricated score
    ((_, fields),) = client.xrange(keys.deadletter)
    letter = decode(entry_message(fields), DeadLetter)
    assert letter.failed_rewards == ["bad"] and "failed after 4 attempts" in letter.reason
    assert letter.policy_version == 3 and len(letter.completions) == 2
    # The one DeadLetter shape (as the trainer writes), with all that is known of the group.
    assert (letter.kind, letter.source, letter.prompt_token_ids) == ("reward_failed", "rollout", [5, 6])
    assert letter.rewards == {"good": [1.0, 1.0]}  # the reward that scored, never a made-up "bad"
    assert client.sismember(keys.dead, letter.group_id) and int(client.get(keys.produced)) == 1
    assert not [decode(entry_message(f), ScoredGroup) for _, f in client.xrange(keys.groups)]
