"""The rollout pipeline: prompts → vLLM (G samples each) → reward fan-out → Redis.

Generation of batch n+1 runs in a worker thread while batch n is being scored, so reward latency hides
behind generation. Weights are synced between batches. Asynchronous by default (bounded by the backlog);
in synchronous mode a batch is generated only once the trainer has finished with everything before it
(backlog 0), so every group is on-policy.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from proto import Completion, DeadLetter, PromptRecord, ScoredGroup, ScoreItem
from proto.config import ExperimentConfig
from proto.messages import GENERATION_SECONDS
from proto.stream import GroupsWanted
from rollout_service.engine import Engine, Sampling
from rollout_service.metrics import RolloutMetrics
from rollout_service.producer import Producer
from rollout_service.prompts import OverlongReport, PromptSource
from rollout_service.rewards_client import RewardClient, RewardFailure
from rollout_service.weights import PolicyFollower

log = logging.getLogger("rollout_service.loop")
POLL_S = 0.05  # a cheap poll; in synchronous mode up to this much latency is added to every step


def training_sampling(config: ExperimentConfig) -> Sampling:
    """How training rollouts are sampled: ``rollout.group_size`` samples at ``rollout.temperature``.

    The trainer scores tokens with softmax(logits / temperature) over the whole vocabulary, the
    release's actor rule; the engine reports log-probs of the distribution it sampled from. Both agree
    only for temperature > 0 and top_p = 1: with top_p < 1 vLLM samples from the nucleus and reports
    log-probs renormalised over it (log π_T − log Z, Z ≤ 1 the nucleus mass), so the first step's ratio
    would be Z instead of 1 on every token, a policy the trainer never optimises. The release samples
    with top_p = 1. Raises ValueError naming the key otherwise.
    """
    rollout = config.rollout
    if rollout.temperature <= 0:
        raise ValueError(
            f"rollout.temperature={rollout.temperature}: training rollouts must be sampled (> 0); "
            "greedy groups are G copies of one answer"
        )
    if rollout.top_p < 1:
        raise ValueError(
            f"rollout.top_p={rollout.top_p}: training rollouts need top_p: 1; nucleus sampling's log-probs "
            "(renormalised over the nucleus) are not the policy the trainer optimises"
        )
    return Sampling(
        n=rollout.group_size,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        max_tokens=config.model.max_response_tokens,
    )


def limit_prompt_length(
    prompts: PromptSource, engine: Engine, config: ExperimentConfig, metrics: RolloutMetrics
) -> OverlongReport:
    """Apply ``data.overlong_prompts`` at start against the engine's prompt token limit (the smaller of
    ``model.max_prompt_tokens`` and the context left by ``model.max_response_tokens``); log and export
    how many prompts were dropped or truncated of how many. Raises :class:`OverlongPrompts`."""
    report = prompts.limit_length(
        lambda records: engine.prompt_lengths([[m.model_dump() for m in r.messages] for r in records]),
        engine.max_prompt_tokens,
        config.data.overlong_prompts,
    )
    metrics.prompts_loaded.set(report.loaded)
    metrics.prompts_dropped.set(report.dropped)
    metrics.prompts_truncated.set(report.truncated)
    log.log(logging.WARNING if report.overlong else logging.INFO, "%s", report.describe())
    return report


class RolloutLoop:
    def __init__(
        self,
        config: ExperimentConfig,
        engine: Engine,
        prompts: PromptSource,
        rewards: RewardClient,
        producer: Producer,
        policy: PolicyFollower,
        metrics: RolloutMetrics,
        producer_id: str | None = None,
    ):
        self.config, self.engine, self.prompts, self.rewards = config, engine, prompts, rewards
        self.producer, self.policy, self.metrics = producer, policy, metrics
        # Group ids must be unique across restarts of a rollout that keeps its name (and prompt position).
        self.session = uuid.uuid4().hex[:8]
        self.producer_id = producer_id or f"rollout-{self.session}"
        self.batches = 0
        self.last_version = 0
        """The policy version the last batch was sampled at."""
        self.served_request: GroupsWanted | None = None  # the trainer's last request for more groups served
        self.batch_prompts = config.rollout.prompts_per_batch  # the next batch's; a request sets it
        self.stopping = asyncio.Event()
        self.sampling = training_sampling(config)

    async def run(self) -> None:
        if not self.config.synchronous:
            how = "rollout.max_backlog"
            if self.config.trainer.dynamic_sampling is not None:
                low, high = self.config.backlog_limits()
                how += f" clamped into [{low}, {high}] by trainer.dynamic_sampling"
            log.info("pausing generation at %d unconsumed groups (%s)", self.config.backlog_bound, how)
        scoring: asyncio.Task | None = None
        try:
            while not self.stopping.is_set() and not self._done():
                await self._wait_for_room(scoring)
                if self.stopping.is_set():
                    break
                await asyncio.to_thread(self.policy.sync)
                if self.config.synchronous and await asyncio.to_thread(self._behind_the_offer):
                    await asyncio.sleep(POLL_S)  # the transfer is tried again (after its pause)
                    continue
                batch = await asyncio.to_thread(self._generate, self.batch_prompts)
                if scoring is not None:
                    await scoring  # keep at most one batch in scoring
                scoring = asyncio.create_task(self._score_and_publish(*batch))
                self.batches += 1
        finally:
            if scoring is not None:
                await scoring

    def _done(self) -> bool:
        limit = self.config.rollout.max_batches
        return limit is not None and self.batches >= limit

    async def _wait_for_room(self, scoring: asyncio.Task | None) -> None:
        """Backpressure. Async: wait while the backlog is at its bound. Synchronous: wait until the
        trainer has read every group and announced weights newer than the last batch's."""
        last = time.perf_counter()
        while not self.stopping.is_set():
            if self.config.synchronous and scoring is not None:
                await scoring  # its groups must be in Redis before "caught up" means anything
            queue = await asyncio.to_thread(self.producer.queue_state)
            self.metrics.record_queue(queue)
            depth = queue.lag
            # The batch still being scored lands in the stream soon: count it, or the rollout runs a
            # batch past the bound and those groups go stale before the trainer gets to them.
            if scoring is not None and not scoring.done():
                depth += self.config.rollout.prompts_per_batch
            if await asyncio.to_thread(self._may_generate, depth):
                return
            await asyncio.sleep(POLL_S)
            now = time.perf_counter()
            self.metrics.backpressure_seconds.inc(now - last)  # live, so a stalled trainer shows at once
            last = now

    def _may_generate(self, depth: int) -> bool:
        if not self.config.synchronous:
            return depth < self.config.backlog_bound
        if self.batches == 0:
            return True
        if depth:
            return False
        # Offered versions count too: with the broadcast transport most versions are never announced as
        # folders, and waiting for the next folder would leave both sides waiting.
        if self.policy.newest_version() > self.last_version:
            self.served_request = None  # requests of older versions are obsolete
            self.batch_prompts = self.config.rollout.prompts_per_batch
            return True
        return self._more_wanted()

    def _behind_the_offer(self) -> bool:
        """Synchronous mode: the trainer offers a version this rollout failed to receive (``transport:
        broadcast``). A batch now would be off-policy — dropped as stale, or trained as if on-policy — so
        the rollout waits and tries the transfer again (PolicyFollower paces the retries); the failures
        show in ``gd2po_rollout_weight_transfer_failures_total``."""
        offer = self.policy.offered()
        return offer is not None and offer.version > self.policy.version

    def _more_wanted(self) -> bool:
        """Synchronous mode: the trainer read every group at the version this rollout samples and still
        lacks groups — informative ones under ``trainer.dynamic_sampling``, or any after groups were
        dead-lettered or a publish failed (proto.stream.want_more_groups). A request
        stands while nothing was produced since it was made; it is served by one batch of the groups
        wanted at that same version, so the extra groups are on-policy too and the trainer reads them all
        within the step."""
        wanted = self.producer.groups_wanted()
        if (
            wanted is None
            or wanted.policy_version != self.last_version
            or wanted == self.served_request
            or wanted.produced != self.producer.produced()
        ):
            return False
        self.served_request = wanted
        self.batch_prompts = wanted.groups  # exactly what the trainer reads in this step: none goes stale
        log.info("the trainer wants %d more group(s) at version %d", wanted.groups, wanted.policy_version)
        return True

    def _generate(
        self, count: int
    ) -> tuple[list[PromptRecord], list[list[int]], list[list[Completion]], int, float, float]:
        """One batch: its prompt records and token ids, G completions each, the policy version sampled,
        the start time, and each group's share of the generation seconds (the batch's time divided by
        its groups; metadata ``generation_seconds``, what a group the trainer skips cost)."""
        records = self.prompts.at(self.producer.claim_prompts(count), count)
        prompt_ids = [self.engine.prompt_ids([m.model_dump() for m in r.messages]) for r in records]
        version, started = self.policy.version, time.time()
        self.last_version = version
        tick = time.perf_counter()
        completions = self.engine.generate(prompt_ids, self.sampling)
        elapsed = time.perf_counter() - tick
        tokens = sum(len(c.token_ids) for group in completions for c in group)
        self.metrics.generation_seconds.observe(elapsed)
        self.metrics.tokens.inc(tokens)
        self.metrics.tokens_per_second.set(tokens / elapsed if elapsed > 0 else 0.0)
        return records, prompt_ids, completions, version, started, elapsed / max(len(records), 1)

    async def _score_and_publish(
        self,
        records: list[PromptRecord],
        prompt_ids: list[list[int]],
        completions: list[list[Completion]],
        version: int,
        started: float,
        generation_seconds: float,
    ) -> None:
        group_ids = [f"{self.producer_id}-{self.session}-{self.batches}-{i}" for i in range(len(records))]
        scored, dead = [], []
        outcomes = await asyncio.gather(
            *(self._score_group(r, g) for r, g in zip(records, completions, strict=True)),
            return_exceptions=True,
        )
        for record, ids, group, group_id, outcome in zip(
            records, prompt_ids, completions, group_ids, outcomes, strict=True
        ):
            if isinstance(outcome, RewardFailure):
                self.metrics.deadletter.labels(outcome.reward).inc()  # one per group: its first failure
                dead.append(
                    DeadLetter(
                        kind="reward_failed",
                        reason=str(outcome),
                        source="rollout",
                        dead_at=time.time(),
                        failed_rewards=outcome.failed,
                        group_id=group_id,
                        prompt_id=record.prompt_id,
                        prompt_token_ids=ids,
                        completions=group,
                        rewards=outcome.scored,
                        policy_version=version,
                        producer_id=self.producer_id,
                        created_at=started,
                        metadata={"label": record.label, "data_source": record.data_source},
                    )
                )
                continue
            if isinstance(outcome, BaseException):
                raise outcome
            scored.append(
                ScoredGroup(
                    group_id=group_id,
                    prompt_id=record.prompt_id,
                    prompt_token_ids=ids,
                    completions=group,
                    rewards=outcome,
                    policy_version=version,
                    created_at=started,
                    scored_at=time.time(),
                    producer_id=self.producer_id,
                    metadata={
                        "label": record.label,
                        "data_source": record.data_source,
                        GENERATION_SECONDS: generation_seconds,
                    },
                )
            )
        if dead:
            log.warning("dead-lettered %d group(s): %s", len(dead), dead[0].reason)
            await asyncio.to_thread(self.producer.dead_letter, dead)
        if scored:
            await asyncio.to_thread(self.producer.publish, scored)
            self.metrics.groups.inc(len(scored))

    async def _score_group(self, record: PromptRecord, group: list[Completion]) -> dict[str, list[float]]:
        items = [
            ScoreItem(id=str(i), prompt=record.messages, completion=c.text, label=record.label)
            for i, c in enumerate(group)
        ]
        return await self.rewards.score(items)
