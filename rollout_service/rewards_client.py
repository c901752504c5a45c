"""Fan a batch out to every reward service concurrently: pooled httpx connections, round-robin over a
reward's replicas, a concurrency limit per endpoint, a timeout, and retries with exponential backoff and
jitter on 5xx / 429 / connection errors only (a 4xx is a bug to surface, not to retry). A reward that
still fails raises :class:`RewardFailure` — the caller dead-letters the group; nothing becomes 0.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from proto import ScoreItem, ScoreRequest, ScoreResponse
from proto.config import RetryConfig, RewardEndpoint
from rollout_service.metrics import RolloutMetrics


class RewardFailure(Exception):
    """A reward could not score some items, after retries where retrying made sense.

    ``failed`` names every reward of the batch that failed (``reward`` is the first) and ``scored`` holds
    the scores of those that did not, so a dead letter keeps all that is known."""

    def __init__(
        self,
        reward: str,
        reason: str,
        *,
        failed: list[str] | None = None,
        scored: dict[str, list[float]] | None = None,
    ):
        super().__init__(f"{reward}: {reason}")
        self.reward, self.reason = reward, reason
        self.failed = failed or [reward]
        self.scored = scored or {}


class _Transient(Exception):
    """Worth retrying: connection trouble, timeout, 5xx or 429."""


@dataclass
class _Endpoint:
    url: str
    limit: asyncio.Semaphore


class RewardClient:
    def __init__(
        self,
        rewards: list[RewardEndpoint],
        retry: RetryConfig,
        metrics: RolloutMetrics,
        token: str | None = None,
    ):
        self.rewards, self.retry, self.metrics = rewards, retry, metrics
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.AsyncClient(
            headers=headers, limits=httpx.Limits(max_connections=256, max_keepalive_connections=64)
        )
        self._replicas = {
            r.name: itertools.cycle(
                [_Endpoint(u.rstrip("/"), asyncio.Semaphore(r.max_concurrency)) for u in r.urls]
            )
            for r in rewards
        }

    async def close(self) -> None:
        await self.client.aclose()

    async def score(self, items: list[ScoreItem]) -> dict[str, list[float]]:
        """Reward name → one score per item, in order. Raises RewardFailure naming the first failure,
        with every failed reward and the scores of the others."""
        names = [r.name for r in self.rewards]
        outcomes = await asyncio.gather(
            *(self._score_reward(r, items) for r in self.rewards), return_exceptions=True
        )
        failures = [(n, o) for n, o in zip(names, outcomes, strict=True) if isinstance(o, BaseException)]
        if failures:
            scored = {n: o for n, o in zip(names, outcomes, strict=True) if not isinstance(o, BaseException)}
            name, first = failures[0]
            reward = first.reward if isinstance(first, RewardFailure) else name
            reason = first.reason if isinstance(first, RewardFailure) else f"{type(first).__name__}: {first}"
            raise RewardFailure(reward, reason, failed=[n for n, _ in failures], scored=scored) from first
        return dict(zip(names, outcomes, strict=True))

    async def _score_reward(self, reward: RewardEndpoint, items: list[ScoreItem]) -> list[float]:
        chunks = [items[i : i + reward.batch_size] for i in range(0, len(items), reward.batch_size)]
        scored = await asyncio.gather(*(self._score_chunk(reward, chunk) for chunk in chunks))
        return [score for chunk in scored for score in chunk]

    async def _score_chunk(self, reward: RewardEndpoint, items: list[ScoreItem]) -> list[float]:
        body = ScoreRequest(items=items).model_dump(mode="json")
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Transient),
            stop=stop_after_attempt(self.retry.attempts),
            wait=wait_exponential_jitter(
                initial=self.retry.backoff_initial, max=self.retry.backoff_max, jitter=self.retry.jitter
            ),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    endpoint = next(self._replicas[reward.name])  # each attempt goes to the next replica
                    if attempt.retry_state.attempt_number > 1:
                        self.metrics.reward_retries.labels(reward.name, endpoint.url).inc()
                    response = await self._post(reward, endpoint, body)
        except _Transient as exc:
            raise RewardFailure(reward.name, f"failed after {self.retry.attempts} attempts: {exc}") from exc
        results = ScoreResponse.model_validate(response.json()).results
        if [r.id for r in results] != [item.id for item in items]:
            raise RewardFailure(reward.name, "response ids do not match the request")
        errors = [f"{r.id}: {r.error}" for r in results if r.status != "ok"]
        if errors:
            raise RewardFailure(reward.name, f"{len(errors)} item(s) failed: {'; '.join(errors[:3])}")
        return [float(r.score) for r in results]

    async def _post(self, reward: RewardEndpoint, endpoint: _Endpoint, body: dict) -> httpx.Response:
        started = time.perf_counter()
        try:
            async with endpoint.limit:
                response = await self.client.post(
                    f"{endpoint.url}/v1/score", json=body, timeout=reward.timeout
                )
        except httpx.TransportError as exc:
            self.metrics.reward_failures.labels(reward.name, endpoint.url).inc()
            raise _Transient(f"{endpoint.url}: {type(exc).__name__}: {exc}") from exc
        self.metrics.reward_call_seconds.labels(reward.name, endpoint.url).observe(
            time.perf_counter() - started
        )
        if response.status_code == 429 or response.status_code >= 500:
            self.metrics.reward_failures.labels(reward.name, endpoint.url).inc()
            raise _Transient(f"{endpoint.url}: HTTP {response.status_code}")
        if response.status_code != 200:
            self.metrics.reward_failures.labels(reward.name, endpoint.url).inc()
            raise RewardFailure(
                reward.name, f"{endpoint.url}: HTTP {response.status_code}: {response.text[:300]}"
            )
        return response
