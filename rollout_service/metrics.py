"""Prometheus metrics of the rollout service (own registry)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proto.stream import QUEUE_METRICS, QueueState

SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class RolloutMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.tokens = Counter("gd2po_rollout_generated_tokens", "Response tokens generated", registry=r)
        self.groups = Counter("gd2po_rollout_groups", "ScoredGroups pushed to Redis", registry=r)
        self.tokens_per_second = Gauge(
            "gd2po_rollout_tokens_per_second", "Generation speed of the last batch", registry=r
        )
        self.generation_seconds = Histogram(
            "gd2po_rollout_generation_seconds", "Wall time to generate one batch", buckets=SECONDS, registry=r
        )
        self.reward_call_seconds = Histogram(
            "gd2po_rollout_reward_call_seconds",
            "Reward call latency",
            ["reward", "endpoint"],
            buckets=SECONDS,
            registry=r,
        )
        self.reward_retries = Counter(
            "gd2po_rollout_reward_retries", "Reward calls retried", ["reward", "endpoint"], registry=r
        )
        self.reward_failures = Counter(
            "gd2po_rollout_reward_failures",
            "Reward call attempts that failed",
            ["reward", "endpoint"],
            registry=r,
        )
        self.deadletter = Counter(
            "gd2po_rollout_deadletter",
            "Groups sent to the dead-letter stream, by failing reward",
            ["reward"],
            registry=r,
        )
        self.queue = {
            name: Gauge(f"gd2po_rollout_{name}", text, registry=r) for name, text in QUEUE_METRICS.items()
        }
        self.backpressure_seconds = Counter(
            "gd2po_rollout_backpressure_seconds", "Time spent waiting for the trainer", registry=r
        )
        self.policy_version = Gauge(
            "gd2po_rollout_policy_version", "Policy version being sampled", registry=r
        )
        self.reload_seconds = Histogram(
            "gd2po_rollout_weight_reload_seconds",
            "Time to reload weights in place",
            buckets=SECONDS,
            registry=r,
        )
        self.prompts_loaded = Gauge(
            "gd2po_rollout_prompts_loaded", "Training prompts read from data.train_files", registry=r
        )
        self.prompts_dropped = Gauge(
            "gd2po_rollout_prompts_dropped",
            "Training prompts over the prompt token limit, dropped at start (data.overlong_prompts: filter)",
            registry=r,
        )
        self.prompts_truncated = Gauge(
            "gd2po_rollout_prompts_truncated",
            "Training prompts over the prompt token limit, kept left-truncated (data.overlong_prompts: "
            "truncate_left)",
            registry=r,
        )
        self.transfer_failures = Counter(
            "gd2po_rollout_weight_transfer_failures",
            "Policy versions not received over the trainer's process group (fell back to the newest folder)",
            registry=r,
        )
        self.reload_failures = Counter(
            "gd2po_rollout_weight_reload_failures", "Weight reloads refused or failed", registry=r
        )

    def record_queue(self, state: QueueState) -> None:
        for name, value in state.as_metrics().items():
            self.queue[name].set(value)
