"""The trainer loop, one step in named phases: pull B fresh groups → learn (advantages, PPO update) →
publish weights → record the step's metrics; every ``trainer.checkpoint.every`` steps a checkpoint, then
the groups it includes are committed (ledger + XACK).

Exactly-once: a group is acknowledged only once a checkpoint holding its update exists, so after a
crash ``--resume`` restores that checkpoint and the pending entries are exactly the groups it lacks.
Every rank computes on its shard of the rollouts; rank 0 talks to Redis and broadcasts each batch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from proto import PolicyAnnouncement, ScoredGroup, WeightOffer, decode
from proto.config import ExperimentConfig
from proto.keys import RedisKeys
from proto.ops import add_ops_routes, harden
from proto.redis_conn import connect
from proto.restarts import restart_metrics
from proto.startup import require_model, wait_for_redis
from trainer import checkpoint
from trainer.algorithms import AdvantageEstimate
from trainer.algorithms.adaptive_tau import TauController
from trainer.batching import GroupRules, TrainBatch, build_batch
from trainer.broadcaster import BroadcastPublisher
from trainer.conflict_map import SourceLabels, conflict_map
from trainer.consumer import Counts, GroupConsumer, Pulled, StepSampling
from trainer.engine import PolicyEngine, ReferencePolicy
from trainer.lora import adapter_state_dict
from trainer.metrics import JsonlLog, StepTimer, TrainerMetrics
from trainer.progress import StepProgress
from trainer.publisher import BackgroundPublisher, WeightPublisher, full_state_dict
from trainer.sampling import InformativeRule, MoreGroups, read_metrics, step_sampling
from trainer.step import advantages_for, estimate_advantages, train_on
from trainer.trackers import StepRollouts, Trackers

log = logging.getLogger("trainer")
MAX_PUBLISH_FAILURES_IN_A_ROW = 3


class UnsupportedOption(ValueError):
    """A configured option this trainer does not implement; refused at start instead of ignored."""


class Trainer:
    def __init__(self, config: ExperimentConfig, *, resume: bool = False, max_steps: int | None = None):
        if not config.rewards:
            raise UnsupportedOption("rewards: at least one reward is needed")
        self.config, self.resume = config, resume
        self.total_steps = min(config.trainer.total_steps, max_steps or config.trainer.total_steps)
        self.metrics = TrainerMetrics()
        self.engine: PolicyEngine | None = None
        self.reference: ReferencePolicy | None = None
        self.ready = False
        self.stopping = threading.Event()
        self.run_dir = Path(config.run.output_dir)
        self.keys = RedisKeys(config.redis.namespace)
        self.publish_failures_total = self.publish_failures_in_a_row = 0
        self.tau_controller: TauController | None = None  # set once a resumed checkpoint's τ is known
        self.source_labels = SourceLabels(config.trainer.conflict_map_sources)
        self.informative = InformativeRule(
            config, tau=lambda: self.tau_controller.tau if self.tau_controller else None
        )
        self.sampling: StepSampling | None = None  # trainer.dynamic_sampling, set once Redis is connected
        self.starved: MoreGroups | None = None  # a synchronous run's requests for more groups, likewise

    # -- HTTP ---------------------------------------------------------------------------------
    def metrics_app(self, *, export: bool = True) -> FastAPI:
        """``/healthz``, ``/readyz`` and ``/metrics``; with ``export=False`` ``/metrics`` answers an empty
        exposition (see :meth:`serve_metrics`)."""
        app = FastAPI(title="gd2po trainer")
        harden(app)
        registry = self.metrics.registry if export else CollectorRegistry()
        add_ops_routes(app, is_ready=lambda: self.ready, registry=registry)
        return app

    def serve_metrics(self, *, export: bool = True) -> uvicorn.Server:
        """Serve the ops routes on ``trainer.host:trainer.metrics_port`` from a daemon thread.

        One process per node serves them: global rank 0 with the trainer's metrics, the first process of
        every other node (``LOCAL_RANK`` 0 of a multi-node run, one pod each) with ``export=False`` — its
        pod still needs ``/healthz`` for the liveness probe and ``/readyz`` once its engine is up, while
        its ``/metrics`` stays empty so Prometheus, which scrapes every trainer pod, sees one copy of
        every ``gd2po_trainer_*`` series, the one rank 0 computes over the whole batch."""
        server = uvicorn.Server(
            uvicorn.Config(
                self.metrics_app(export=export),
                host=self.config.trainer.host,
                port=self.config.trainer.metrics_port,
                log_level="warning",
            )
        )
        server.install_signal_handlers = lambda: None  # the training loop owns signals
        threading.Thread(target=server.run, daemon=True, name="metrics-http").start()
        return server

    # -- training -----------------------------------------------------------------------------
    def check_dependencies(self) -> None:
        """Model folder(s) and Redis, before minutes of model loading (raises StartupError)."""
        require_model(self.config.model.path)
        if self.config.trainer.loss.kl_coef and self.config.trainer.loss.reference_path is not None:
            require_model(self.config.trainer.loss.reference_path, key="trainer.loss.reference_path")
        wait_for_redis(self.config.redis, self.config.run.startup_timeout)

    def run(self) -> checkpoint.TrainerState:
        self.check_dependencies()
        # Rank 0 logs to the trackers; they start before minutes of model loading, so one that cannot
        # start fails the run at once (TrackerError). The engine sets up ranks, so read it as it does.
        trackers = (
            Trackers.open(self.config, resume=self.resume) if os.environ.get("RANK", "0") == "0" else None
        )
        failed = True
        try:
            state = self._train(trackers)
            failed = False
            return state
        finally:
            if trackers is not None:
                trackers.close(failed=failed)

    def _train(self, trackers: Trackers | None) -> checkpoint.TrainerState:
        engine = self.engine = PolicyEngine(self.config)
        if self.config.trainer.loss.kl_coef:
            self.reference = ReferencePolicy(
                self.config.trainer.loss.reference_path or self.config.model.path,
                self.config.model.dtype,
                engine.device,
                temperature=engine.temperature,
                autocast=engine.autocast_dtype,
                attn_implementation=self.config.model.attn_implementation,
            )
        rank = dist.get_rank()
        client = connect(self.config.redis)
        consumer = None
        if rank == 0:
            rules = GroupRules.for_model(self.config.reward_names, engine.module)
            consumer = GroupConsumer(
                client, self.keys, rules=rules, max_crashes=self.config.trainer.max_crashes_per_group
            )
        publisher = WeightPublisher(
            client,
            self.keys,
            self.run_dir / "weights",
            self.config.model.path,
            self.config.trainer.publish.keep_last,
        )
        if self.config.trainer.publish.background and rank == 0:
            publisher = BackgroundPublisher(publisher)
        if self.config.trainer.publish.transport == "broadcast" and rank == 0:
            # Its folders (every disk_every publishes) go through the background writer when there is one.
            publisher = BroadcastPublisher(
                client, self.keys, publisher, self.config.trainer.publish.broadcast, self.metrics.registry
            )
        state = checkpoint.TrainerState()
        if self.resume:
            state = checkpoint.load_latest(engine, self.run_dir / "checkpoints") or state
            if consumer is not None and state.committing:
                # The checkpoint has these groups' update; finish recording them (their redelivered
                # entries are then acknowledged as duplicates, never trained twice).
                client.sadd(self.keys.trained, *state.committing)
            announced = client.get(self.keys.policy)
            if announced:
                state.policy_version = max(
                    state.policy_version, decode(announced, PolicyAnnouncement).version
                )
            offered = client.get(self.keys.weights_offer)  # broadcast: versions past the last folder
            if offered:
                state.policy_version = max(state.policy_version, decode(offered, WeightOffer).version)
            log.info("resumed at step %d, policy version %d", state.step, state.policy_version)
        if rank == 0:  # after the resume read it, whatever the transport: no process serves it any more
            client.delete(self.keys.weights_offer)
        self.tau_controller = tau_controller(self.config, state.tau)
        self.sampling = step_sampling(self.config, self.informative)
        self.starved = self._starved(client, state)
        journal = JsonlLog(self.run_dir / "metrics.jsonl")
        counts = Counts()
        uncommitted = Pulled()
        self.ready = True
        progress = StepProgress(self.total_steps, start=state.step) if rank == 0 else None
        try:
            if self.config.synchronous and state.step > 0:
                # Resumed: the restored weights are the checkpoint's, not those of the last version
                # published (later, lost with the crash), and the rollout may not even hold that version
                # (offered, never sent) — it would wait for a newer one while this trainer waits for
                # groups. Publish them as a new version first: the next batch samples exactly these weights.
                self._publish(engine, publisher, state)
            while not self._budget_spent(state) and not self.stopping.is_set():
                step = self._one_step(engine, consumer, publisher, state, counts, uncommitted)
                if step is None:
                    break
                record, rollouts = step
                if rank == 0:
                    journal.write(record)
                    if trackers is not None:
                        trackers.report(record, rollouts)
                    if progress:
                        progress.update(record)
                if state.step % self.config.trainer.checkpoint.every == 0 or self._budget_spent(state):
                    self._checkpoint_and_commit(engine, consumer, state, uncommitted)
        finally:
            publisher.close()  # the last version is announced before the trainer reports done
            if progress:
                progress.close()
        return state

    def _budget_spent(self, state: checkpoint.TrainerState) -> bool:
        """``total_steps`` done, or ``trainer.total_samples`` rollouts read (trained or skipped)."""
        budget = self.config.trainer.total_samples
        return state.step >= self.total_steps or (budget is not None and state.samples_read >= budget)

    def _starved(self, client, state: checkpoint.TrainerState) -> MoreGroups | None:
        """What the consumer tells when a read comes back empty mid-step: a synchronous run asks the
        rollout for a batch of the groups it still wants, at this version. Asked before the
        new version's own batch came, the request is stale once that batch is produced
        (proto.stream.want_more_groups), so it never doubles it."""
        if not self.config.synchronous:
            return None
        return MoreGroups(client, self.keys, lambda: state.policy_version)

    def _checkpoint_and_commit(
        self,
        engine: PolicyEngine,
        consumer: GroupConsumer | None,
        state: checkpoint.TrainerState,
        uncommitted: Pulled,
    ) -> None:
        """Save the checkpoint naming the groups it includes, then acknowledge them.

        A crash before the save redelivers the groups to a trainer restored from the previous
        checkpoint (trained once); a crash after it is finished on resume from ``state.committing``.
        """
        state.committing = [g.group_id for g in uncommitted.groups]
        checkpoint.save(
            engine, self.run_dir / "checkpoints", state, keep_last=self.config.trainer.checkpoint.keep_last
        )
        if consumer is not None and uncommitted.groups:
            consumer.commit(uncommitted)
            self.metrics.groups.labels("trained").inc(len(uncommitted.groups))
        uncommitted.groups.clear()
        uncommitted.entry_ids.clear()

    def _one_step(
        self,
        engine: PolicyEngine,
        consumer: GroupConsumer | None,
        publisher: WeightPublisher | BackgroundPublisher | BroadcastPublisher,
        state: checkpoint.TrainerState,
        counts: Counts,
        uncommitted: Pulled,
    ) -> tuple[dict[str, float], StepRollouts] | None:
        """One step in four phases — pull, learn, publish, record — timed by one step timer: its record
        and its rollouts with their advantages, or None when the trainer is stopping before a full batch
        arrived."""
        timer = StepTimer()
        with timer.phase("wait"):
            pulled = self._pull(consumer, state, counts)
            if consumer is not None and len(pulled.groups) == self.config.trainer.prompts_per_step:
                # From here to the end of the update, dying counts a crash for each of these groups.
                consumer.begin_step(pulled.groups)
            # Every rank records the skipped groups too: the sample budget must end every rank's loop alike.
            groups, pulled.skipped, pulled.informative = _broadcast(
                (pulled.groups, pulled.skipped, pulled.informative)
            )
        if len(groups) < self.config.trainer.prompts_per_step:
            return None  # stopping
        try:
            if self.sampling is None:  # counted at the τ this step trains with (_learn moves an adaptive τ)
                pulled.informative = sum(map(self.informative, groups))
            batch, estimate, record = self._learn(engine, groups, state, timer)
        except KeyboardInterrupt:  # Ctrl-C is an operator's stop, not a crash the groups caused
            if consumer is not None:
                consumer.end_step()
            raise
        if consumer is not None:
            consumer.end_step()
        state.step += 1
        with timer.phase("publish"):
            self._publish(engine, publisher, state)
        record = self._record(
            record, groups, pulled, batch, estimate, state, counts, consumer, uncommitted, timer
        )
        return record, StepRollouts.of(groups, estimate.advantages, batch.response_mask)

    def _pull(self, consumer: GroupConsumer | None, state: checkpoint.TrainerState, counts: Counts) -> Pulled:
        """Rank 0 reads the step's fresh groups (counting those it skips or dead-letters); other ranks get
        them by broadcast."""
        if consumer is None:
            return Pulled()
        trainer = self.config.trainer
        before = (
            counts.stale,
            counts.duplicate,
            counts.untrainable,
            counts.undecodable,
            counts.skipped,
            counts.crashed_trainer,
        )
        pulled = consumer.pull(
            trainer.prompts_per_step,
            state.policy_version,
            trainer.max_staleness,
            counts,
            self.stopping.is_set,
            self.sampling,
            self.starved,
        )
        self.metrics.groups.labels("stale").inc(counts.stale - before[0])
        self.metrics.groups.labels("skipped").inc(counts.skipped - before[4])
        self.metrics.count_stale(counts.stale_producers)
        counts.stale_producers.clear()
        self.metrics.groups.labels("duplicate").inc(counts.duplicate - before[1])
        self.metrics.groups.labels("untrainable").inc(counts.untrainable - before[2])
        self.metrics.groups.labels("undecodable").inc(counts.undecodable - before[3])
        self.metrics.groups.labels("crashed_trainer").inc(counts.crashed_trainer - before[5])
        return pulled

    def _learn(
        self,
        engine: PolicyEngine,
        groups: list[ScoredGroup],
        state: checkpoint.TrainerState,
        timer: StepTimer,
    ) -> tuple[TrainBatch, AdvantageEstimate, dict[str, float]]:
        """Advantages over the whole batch, then the PPO update on this rank's shard of it."""
        controller = self.tau_controller
        tau = controller.tau if controller else None
        with timer.phase("advantages"):
            batch = build_batch(groups, self.config.reward_names, state.policy_version, engine.pad_id)
            estimate = advantages_for(batch, self.config, tau=tau)
        with timer.phase("conflict_map"):
            by_source = conflict_map(
                batch.rewards,
                batch.group_index,
                batch.response_mask,
                [str(g.metadata.get("data_source", "")) for g in groups],
                self.source_labels,
                lambda r, g, m: estimate_advantages(r, g, m, self.config, tau).metrics,
            )
        shard = _shard(batch.size)
        record = train_on(
            engine, batch.select(shard), estimate.advantages[shard], self.config, self.reference, timer=timer
        )
        record.update(by_source)
        if controller is not None:
            # Every rank computed the same estimate from the same broadcast batch: τ stays identical.
            record["tau"] = controller.tau
            state.tau = controller.update(estimate.metrics["drop_ratio"])
        elif self.config.trainer.advantage.estimator == "gd2po_snr":
            record["tau"] = self.config.trainer.advantage.tau
        return batch, estimate, record

    def _publish(
        self,
        engine: PolicyEngine,
        publisher: WeightPublisher | BackgroundPublisher | BroadcastPublisher,
        state: checkpoint.TrainerState,
    ) -> None:
        """Every ``trainer.publish.every`` steps, a new policy version for the rollout."""
        publish = self.config.trainer.publish
        if not (publish.every and state.step % publish.every == 0):
            return
        writer = dist.get_rank() == 0  # every rank takes part in a ZeRO-3 gather; rank 0 writes
        lora = self.config.trainer.lora
        if lora is not None and lora.serve == "adapter":  # the adapter alone; the rollout keeps its base
            source, weights = engine.peft_model, adapter_state_dict(engine.peft_model)
        else:
            source = engine.module
            weights = full_state_dict(
                engine.module, engine.zero_stage, snapshot=publish.background and writer
            )
        failure: OSError | None = None
        if writer:
            try:
                publisher.publish(source, weights, state.policy_version + 1, state.step)
            except OSError as exc:
                if publish.background:
                    raise  # surfaced a publish late, its version already counted: see _publish_failed
                failure = exc
            else:
                state.policy_version += 1
                self.publish_failures_in_a_row = 0
        state.policy_version = _broadcast(state.policy_version)  # every rank, before rank 0 may raise
        if failure is not None:
            self._publish_failed(failure)

    def _publish_failed(self, exc: OSError) -> None:
        """A synchronous publish that failed on the disk (full, gone, an injected fault) costs the rollout
        one version, not the run: training goes on and the next publish retries with the same version
        number. A disk that keeps failing is not transient: the :data:`MAX_PUBLISH_FAILURES_IN_A_ROW`-th
        failure in a row ends the trainer (then its restart policy). With ``publish.background`` a failed
        write is raised one publish late, when its version was already counted, and ends the trainer as
        any other error."""
        self.publish_failures_total += 1
        self.publish_failures_in_a_row += 1
        self.metrics.publish_failures.inc()
        if self.publish_failures_in_a_row >= MAX_PUBLISH_FAILURES_IN_A_ROW:
            raise exc
        log.error(
            "publishing weights failed (%d in a row; the trainer stops at %d): %s",
            self.publish_failures_in_a_row,
            MAX_PUBLISH_FAILURES_IN_A_ROW,
            exc,
        )

    def _record(
        self,
        record: dict[str, float],
        groups: list[ScoredGroup],
        pulled: Pulled,
        batch: TrainBatch,
        estimate: AdvantageEstimate,
        state: checkpoint.TrainerState,
        counts: Counts,
        consumer: GroupConsumer | None,
        uncommitted: Pulled,
        timer: StepTimer,
    ) -> dict[str, float]:
        """Hold the step's groups for the next commit, and complete and export its record."""
        staleness = batch.group_staleness()  # one value per group, not one per rollout
        if consumer is not None:
            uncommitted.groups.extend(pulled.groups)
            uncommitted.entry_ids.extend(pulled.entry_ids)
            for age in staleness:
                self.metrics.staleness.observe(age)
            record.update(self.metrics.record_producers([g.producer_id for g in groups], staleness))
        state.groups_trained += len(groups)
        state.samples_read += sum(g.group_size for g in (*groups, *pulled.skipped))
        wait = timer.seconds["wait"]
        record.update(estimate.metrics)
        record.update(read_metrics(groups, pulled.skipped, pulled.informative, self.config.reward_names))
        record.update(
            {
                "step": state.step,
                "policy_version": state.policy_version,
                "groups": len(groups),
                "group_ids": [g.group_id for g in groups],
                "tokens_per_second": record["tokens_trained"] / max(timer.total() - wait, 1e-9),
                **timer.record(),
                "staleness_mean": sum(staleness) / len(staleness),  # over groups, as the histogram
                "stale_dropped_total": counts.stale,
                "skipped_total": counts.skipped,
                "samples_read_total": state.samples_read,
                "duplicates_total": counts.duplicate,
                "untrainable_total": counts.untrainable,
                "undecodable_total": counts.undecodable,
                "crashed_trainer_total": counts.crashed_trainer,
                "publish_failures_total": self.publish_failures_total,  # by this trainer process
                "last_step_timestamp_seconds": time.time(),
            }
        )
        if consumer is not None:
            record.update(consumer.queue_state().as_metrics())
        record.update(restart_metrics(self.run_dir))  # children `gd2po up` restarted so far, if it runs us
        self.metrics.record(record, estimate.group_keep.tolist())
        return record


def tau_controller(config: ExperimentConfig, saved_tau: float | None) -> TauController | None:
    """The controller of ``trainer.advantage.adaptive_tau`` (None when τ is fixed), starting from the τ a
    resumed checkpoint saved, else from ``trainer.advantage.tau``."""
    advantage = config.trainer.advantage
    adaptive = getattr(advantage, "adaptive_tau", None)
    if adaptive is None:
        return None
    return TauController(
        target=adaptive.target_drop_ratio,
        gain=adaptive.gain,
        tau_min=adaptive.tau_min,
        tau_max=adaptive.tau_max,
        tau=advantage.tau if saved_tau is None else saved_tau,
    )


def _broadcast(value):
    """Rank 0's value on every rank (no-op for a single process)."""
    if dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _shard(size: int) -> torch.Tensor:
    """This rank's rollouts: a strided slice so every rank gets a share of every group."""
    return torch.arange(dist.get_rank(), size, dist.get_world_size())
