"""Wire the rollout service together: engine, prompts, rewards client, producer, policy follower, loop
and HTTP API. The engine loads in the background so /healthz answers at once and /readyz when ready."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI

from proto.audit import AuditLog, produced_log_path
from proto.config import ExperimentConfig, mask_url
from proto.keys import RedisKeys
from proto.redis_conn import connect
from proto.startup import (
    StartupError,
    redis_reachable,
    require_files,
    require_model,
    wait_for_redis,
    wait_for_rewards,
)
from rollout_service.api import create_api
from rollout_service.engine import Engine
from rollout_service.loop import RolloutLoop, limit_prompt_length
from rollout_service.metrics import RolloutMetrics
from rollout_service.producer import Producer
from rollout_service.prompts import PromptSource
from rollout_service.rewards_client import RewardClient
from rollout_service.weights import PolicyFollower

log = logging.getLogger("rollout_service")
FOLLOW_S = 1.0  # serve-only: how often to look for a newer policy


class RolloutService:
    def __init__(self, config: ExperimentConfig, *, run_loop: bool = True, on_fatal=None):
        self.config, self.run_loop, self.on_fatal = config, run_loop, on_fatal
        self.metrics = RolloutMetrics()
        self.keys = RedisKeys(config.redis.namespace)
        self.engine: Engine | None = None
        self.policy: PolicyFollower | None = None
        self.loop: RolloutLoop | None = None
        self.ready = False
        self.failure: BaseException | None = None
        token = config.auth.token.get_secret_value() if config.auth.token else None
        self.token = token
        # Names this rollout's groups, audit log and weight requests; random unless configured.
        self.producer_id = config.rollout.producer_id or f"rollout-{uuid.uuid4().hex[:8]}"
        self.app: FastAPI = create_api(
            self,  # the routes read self.engine and self.policy, None until _start loads them
            metrics=self.metrics,
            token=token,
            is_ready=lambda: self.ready and self.failure is None,
            is_alive=lambda: self.failure is None,
            weights_root=config.rollout.weights_root or config.run.output_dir / "weights",
            lifespan=self._lifespan,
        )

    def _start(self) -> None:
        """Blocking start-up (dependency checks, engine load); runs in a worker thread."""
        config = self.config
        require_model(config.model.path)
        client: redis.Redis | None = None
        if self.run_loop:
            require_files(config.data.train_files)
            wait_for_redis(config.redis, config.run.startup_timeout)
            client = connect(config.redis)
        elif redis_reachable(config.redis):
            client = connect(config.redis)  # serve-only follows new policies when Redis is there
        else:
            log.warning(
                "Redis at %s is not reachable: serving %s without following new policies",
                mask_url(config.redis.url),
                config.model.path,
            )
        self.engine = Engine(
            config.model,
            seed=config.run.seed,
            kv_cache_gib=config.rollout.kv_cache_gib,
            enforce_eager=config.rollout.enforce_eager,
            lora_rank=_served_lora_rank(config),
            tensor_parallel_size=config.rollout.tensor_parallel_size,
        )
        self.policy = PolicyFollower(
            self.engine,
            client,
            self.keys,
            self.metrics,
            producer_id=self.producer_id,
            transfer_timeout=config.trainer.publish.broadcast.timeout,
        )
        self.policy.sync()  # a restarted rollout serves the current policy, not the initial weights
        if not self.run_loop:
            return
        # After the engine load, which gives reward services started beside this one time to come up.
        wait_for_rewards(config.rewards, config.run.startup_timeout)
        prompts = PromptSource(
            config.data.train_files,
            prompt_field=config.data.prompt_field,
            label_field=config.data.label_field,
            seed=config.data.shuffle_seed,
        )
        limit_prompt_length(prompts, self.engine, config, self.metrics)  # before the fingerprint
        self.loop = RolloutLoop(
            config,
            self.engine,
            prompts,
            RewardClient(config.rewards, config.rollout.retry, self.metrics, self.token),
            Producer(client, self.keys),
            self.policy,
            self.metrics,
            producer_id=self.producer_id,
        )
        if config.run.audit:  # named after the producer id, which the loop settles
            self.loop.producer.audit = AuditLog(
                produced_log_path(config.run.output_dir, self.loop.producer_id)
            )
        # One prompt order for every replica and restart: positions come from Redis (Producer.claim_prompts).
        self.loop.producer.agree_on_prompt_order(prompts.fingerprint())

    @asynccontextmanager
    async def _lifespan(self, app: FastAPI):
        task = asyncio.create_task(self._main())
        yield
        if self.loop is not None:
            self.loop.stopping.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _main(self) -> None:
        try:
            await asyncio.to_thread(self._start)
            self.ready = True
            if self.run_loop:
                await self.loop.run()
                log.info("rollout loop finished after %d batches", self.loop.batches)
            elif self.policy.client is not None:
                await self._follow()
        except asyncio.CancelledError:
            raise
        except StartupError as exc:
            log.error("%s", exc)  # one line saying what to change; a traceback would bury it
            self.failure = exc
            if self.on_fatal is not None:
                self.on_fatal()
        except Exception as exc:
            log.exception("rollout service failed")
            self.failure = exc
            if self.on_fatal is not None:
                self.on_fatal()

    async def _follow(self) -> None:
        """Serve-only: reload when the trainer announces a newer policy; a Redis outage only pauses this."""
        while True:
            try:
                await asyncio.to_thread(self.policy.sync)
            except redis.RedisError as exc:
                log.warning("cannot read the current policy: %s", exc)
            await asyncio.sleep(FOLLOW_S)


def _served_lora_rank(config: ExperimentConfig) -> int | None:
    """The adapter rank the engine must serve: ``trainer.lora.r`` under ``trainer.lora.serve: adapter``
    (the trainer publishes adapters, not whole models), else None."""
    lora = config.trainer.lora
    return lora.r if lora is not None and lora.serve == "adapter" else None
