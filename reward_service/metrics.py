"""Prometheus metrics of one reward service (own registry, so several apps can live in one process)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass
class RewardMetrics:
    reward: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "gd2po_reward_requests",
            "HTTP requests by route and status code",
            ["reward", "route", "code"],
            registry=r,
        )
        self.items = Counter(
            "gd2po_reward_items", "Scored items by outcome", ["reward", "status"], registry=r
        )
        self.latency = Histogram(
            "gd2po_reward_request_latency_seconds", "Scoring request latency", ["reward", "route"], registry=r
        )
        self.batch_size = Histogram(
            "gd2po_reward_batch_size",
            "Items per scoring request",
            ["reward"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "gd2po_reward_errors", "Item errors by exception kind", ["reward", "kind"], registry=r
        )
        self.inflight = Gauge(
            "gd2po_reward_inflight_requests", "Scoring requests in progress", ["reward"], registry=r
        )
        self.rejected = Counter(
            "gd2po_reward_rejected",
            "Requests refused (too large, too busy)",
            ["reward", "reason"],
            registry=r,
        )
