"""Trainer observability: Prometheus gauges/counters/histograms (live GD²PO signals included) and a
JSONL record per step in the run folder."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proto.stream import QUEUE_METRICS
from trainer.conflict_map import SourceLabels

PHASES = ("wait", "advantages", "conflict_map", "forward_backward", "optimizer", "publish")
"""What a step's time is split into (``gd2po_trainer_step_phase_seconds{phase}``, ``phase/<name>`` in the
record): waiting for groups (the pull), advantages, the per-source conflict map (0 when
``trainer.conflict_map_sources`` is 0), forward+backward and optimizer steps (the learning), weight
publishing."""
GROUP_OUTCOMES = ("trained", "stale", "skipped", "duplicate", "untrainable", "undecodable", "crashed_trainer")
"""Where each group pulled from the stream ends (``gd2po_trainer_groups_total{outcome}``): trained, dropped
as too stale, skipped without signal (``trainer.dynamic_sampling``), skipped as a second copy, or
dead-lettered because it cannot be trained, does not decode, or was in a step the trainer died in
``trainer.max_crashes_per_group`` times."""
PRODUCER_LABELS = 16
"""Rollout replicas (producer ids) that keep their own label; later ones count as ``other``. ``gd2po up``
names replicas rollout-0, rollout-1, …; unnamed replicas (compose, Helm) get a new random name per process
start, so a long run's restarts would otherwise grow the series without bound."""
RATIO_BUCKETS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
SCALARS = {
    "conflict_ratio": "Fraction of rollouts whose per-reward advantages have mixed signs",
    "drop_ratio": "Fraction of rollouts dropped by the conflict filter",
    "keep_ratio": "Fraction of rollouts kept",
    "rho_abs_mean_in_conflict": "Mean |ρ| over conflicting rollouts",
    "tau": "GD²PO-SNR threshold τ the last step used (moves with trainer.advantage.adaptive_tau; 0 for other estimators)",
    "loss": "Policy loss",
    "grad_norm": "Global gradient norm before clipping",
    "learning_rate": "Learning rate",
    "kl": "Approximate KL to the behaviour policy (k3)",
    "kl_ref": "KL to the reference policy (k3; 0 unless trainer.loss.kl_coef > 0)",
    "entropy": "Mean token entropy (0 unless entropy is computed)",
    "clip_fraction": "Fraction of tokens where the PPO ratio clip is active",
    "tokens_per_second": "Response tokens trained per second of step time (skipped idle rows not counted)",
    "rows_trained": "Rollouts forwarded per optimizer step (rows with an all-zero advantage are skipped)",
    "optimizer_steps": "Optimizer steps in the last trainer step (0 when no rollout had a gradient)",
    "groups_read_per_trained": "Groups read per group trained in the last step (above 1: trainer.dynamic_sampling skipped some)",
    "informative_ratio": "Fraction of the last step's groups read that carry a gradient under the estimator",
    "informative_groups": "Groups of the last step's batch that carry a gradient (below its groups: the read bound filled it)",
    **QUEUE_METRICS,
    "step": "Last completed trainer step",
    "policy_version": "Version of the last published policy",
    "last_step_timestamp_seconds": "Unix time of the last completed step",
}


@dataclass
class TrainerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self._source_labels: dict[Gauge, set[tuple[str, ...]]] = {}  # per-source series the last step set
        self.gauges = {
            name: Gauge(f"gd2po_trainer_{name}", text, registry=r) for name, text in SCALARS.items()
        }
        self.group_keep = Gauge(
            "gd2po_trainer_group_keep_ratio", "Per-group keep ratio κ", ["stat"], registry=r
        )
        self.pair_conflict = Gauge(
            "gd2po_trainer_pair_conflict_ratio",
            "Rollouts where two rewards pull in opposite directions",
            ["pair"],
            registry=r,
        )
        # The conflict map (trainer/conflict_map.py): labels bounded by trainer.conflict_map_sources.
        self.source_conflict = Gauge(
            "gd2po_trainer_source_conflict_ratio",
            "Conflict ratio over the last step's rollouts of one data source",
            ["source"],
            registry=r,
        )
        self.source_drop = Gauge(
            "gd2po_trainer_source_drop_ratio",
            "Fraction of one data source's rollouts dropped by the conflict filter in the last step",
            ["source"],
            registry=r,
        )
        self.source_pair_conflict = Gauge(
            "gd2po_trainer_source_pair_conflict_ratio",
            "Fraction of one data source's rollouts where two rewards push in opposite directions",
            ["source", "pair"],
            registry=r,
        )
        self.reward_mean = Gauge("gd2po_trainer_reward_mean", "Mean raw reward", ["reward"], registry=r)
        self.reward_std = Gauge("gd2po_trainer_reward_std", "Std of raw rewards", ["reward"], registry=r)
        self.reward_informative = Gauge(
            "gd2po_trainer_reward_informative_ratio",
            "Fraction of the last step's groups read whose rewards in this dimension are not all equal",
            ["reward"],
            registry=r,
        )
        self.skipped_generation_seconds = Counter(
            "gd2po_trainer_skipped_generation_seconds",
            "Rollout seconds spent generating groups the trainer skipped without signal (trainer.dynamic_sampling)",
            registry=r,
        )
        self.zero_std = Gauge(
            "gd2po_trainer_zero_std_group_ratio",
            "Groups whose reward has no variance",
            ["reward"],
            registry=r,
        )
        self.keep_distribution = Histogram(
            "gd2po_trainer_group_keep_ratio_distribution",
            "Per-group keep ratios",
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.staleness = Histogram(
            "gd2po_trainer_staleness",
            "Policy versions between generation and training",
            buckets=(0, 1, 2, 3, 4, 8, 16),
            registry=r,
        )
        # Per rollout replica (ScoredGroup.producer_id), labels bounded: see PRODUCER_LABELS.
        self.producer_labels = SourceLabels(PRODUCER_LABELS)
        self.producer_staleness = Histogram(
            "gd2po_trainer_producer_staleness",
            "Policy versions between generation and training, by rollout replica (producer id)",
            ["producer"],
            buckets=(0, 1, 2, 3, 4, 8, 16),
            registry=r,
        )
        self.producer_groups = Counter(
            "gd2po_trainer_producer_groups",
            "Groups of one rollout replica (producer id) trained, or dropped as too stale",
            ["producer", "outcome"],
            registry=r,
        )
        self.phase_seconds = Histogram(
            "gd2po_trainer_step_phase_seconds", "Step time by phase", ["phase"], registry=r
        )
        self.groups = Counter("gd2po_trainer_groups", "Groups by outcome", ["outcome"], registry=r)
        self.all_filtered = Counter(
            "gd2po_trainer_all_filtered_batches", "Batches where the filter dropped every rollout", registry=r
        )
        self.steps = Counter("gd2po_trainer_steps", "Optimizer steps", registry=r)
        self.publish_failures = Counter(
            "gd2po_trainer_publish_failures",
            "Weight publishes that failed on the disk (training went on; the next publish retried)",
            registry=r,
        )
        for outcome in GROUP_OUTCOMES:
            self.groups.labels(outcome)
        for phase in PHASES:
            self.phase_seconds.labels(phase)

    def record(self, step: dict[str, float], keep_ratios: list[float]) -> None:
        """Push one step's flat record (see trainer.step) to the Prometheus series."""
        by_source: dict[Gauge, dict[tuple[str, ...], float]] = {
            self.source_conflict: {},
            self.source_drop: {},
            self.source_pair_conflict: {},
        }
        for key, value in step.items():
            if key in self.gauges:
                self.gauges[key].set(value)
            elif key.startswith("group_keep_ratio_"):
                self.group_keep.labels(key.removeprefix("group_keep_ratio_")).set(value)
            elif key.startswith("pair_conflict_ratio/"):
                self.pair_conflict.labels(key.split("/", 1)[1]).set(value)
            elif key.startswith("source_conflict_ratio/"):
                by_source[self.source_conflict][(key.split("/", 1)[1],)] = value
            elif key.startswith("source_drop_ratio/"):
                by_source[self.source_drop][(key.split("/", 1)[1],)] = value
            elif key.startswith("source_pair_conflict_ratio/"):
                pair_key = tuple(key.removeprefix("source_pair_conflict_ratio/").rsplit("/", 1))
                by_source[self.source_pair_conflict][pair_key] = value
            elif key.startswith("reward_mean/"):
                self.reward_mean.labels(key.split("/", 1)[1]).set(value)
            elif key.startswith("reward_std/"):
                self.reward_std.labels(key.split("/", 1)[1]).set(value)
            elif key.startswith("reward_informative_ratio/"):
                self.reward_informative.labels(key.split("/", 1)[1]).set(value)
            elif key.startswith("zero_std_group_ratio/"):
                self.zero_std.labels(key.split("/", 1)[1]).set(value)
            elif key.startswith("phase/"):
                self.phase_seconds.labels(key.split("/", 1)[1]).observe(value)
        self._set_source_series(by_source)
        for ratio in keep_ratios:
            self.keep_distribution.observe(ratio)
        self.skipped_generation_seconds.inc(step.get("skipped_generation_seconds", 0.0))
        if step.get("all_filtered", 0.0) >= 1.0:
            self.all_filtered.inc()
        self.steps.inc()

    def record_producers(self, producers: list[str], ages: list[int]) -> dict[str, float]:
        """Staleness per rollout replica of one step's trained groups (``producers[i]`` made the group of
        age ``ages[i]`` policy versions): observed in ``gd2po_trainer_producer_staleness``, counted as
        trained, and returned as ``producer_staleness_mean/<producer>`` record keys."""
        ages_of: dict[str, list[int]] = {}
        for producer, age in zip(producers, ages, strict=True):
            label = self.producer_labels.label(producer)
            ages_of.setdefault(label, []).append(age)
            self.producer_staleness.labels(label).observe(age)
            self.producer_groups.labels(label, "trained").inc()
        return {f"producer_staleness_mean/{label}": sum(a) / len(a) for label, a in ages_of.items()}

    def count_stale(self, producers: list[str]) -> None:
        """Groups dropped as too stale, by the rollout replica that made them."""
        for producer in producers:
            self.producer_groups.labels(self.producer_labels.label(producer), "stale").inc()

    def _set_source_series(self, by_source: dict[Gauge, dict[tuple[str, ...], float]]) -> None:
        """Set this step's per-source series, then remove those of sources absent from it (so they show no
        value rather than their last one) — in that order, so a scrape never sees a present source missing."""
        for gauge, values in by_source.items():
            for label, value in values.items():
                gauge.labels(*label).set(value)
            for stale in self._source_labels.get(gauge, set()) - values.keys():
                gauge.remove(*stale)
            self._source_labels[gauge] = set(values)


class StepTimer:
    """Seconds one trainer step spends in each of `PHASES`. A phase entered several times (one
    forward/backward per micro-batch) accumulates; an unknown name is refused, so every timed phase is
    one the metrics export."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in self.seconds:
            raise ValueError(f"unknown step phase {name!r}; known: {', '.join(PHASES)}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def total(self) -> float:
        """The step's time: every phase, added in `PHASES` order."""
        return sum(self.seconds[name] for name in PHASES)

    def record(self) -> dict[str, float]:
        return {f"phase/{name}": seconds for name, seconds in self.seconds.items()}


class JsonlLog:
    """Append one JSON object per step; flushed each time so a crash loses at most the current step."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, float]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"time": time.time(), **record}) + "\n")
