"""A rollout facing an offer it cannot receive (``transport: broadcast``, trainer unreachable): each
failure pauses transfers for a timeout, doubling with each failure in a row, and the same version is
tried again after the pause — a synchronous run waits for that version, so never retrying it would stall
the run for good; an offer from another store address ends the pause. Against a real Redis; the offers
name ports nobody listens on."""

from __future__ import annotations

import time
from typing import ClassVar

import pytest
import redis
from prometheus_client import CollectorRegistry

from gd2po.ports import free_port
from proto import WeightOffer, encode
from proto.keys import RedisKeys
from rollout_service.metrics import RolloutMetrics
from rollout_service.weights import PolicyFollower

pytestmark = pytest.mark.integration
KEYS = RedisKeys("follower-backoff")
TIMEOUT_S = 0.5


class NoEngine:
    """Where the transfer would land; it never gets that far (nobody serves the offer)."""

    tensor_parallel_size = 1
    transfer_backends: ClassVar[list[str]] = ["gloo"]

    def receive(self, host: str, port: int, nonce: str, timeout_s: float) -> dict:
        raise ConnectionError(f"nobody serves {host}:{port}")


def test_failed_transfers_back_off_and_retry_the_same_version(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    offer = WeightOffer(
        version=4, digest="blake3:" + "0" * 64, step=4, host="127.0.0.1", port=free_port(), created_at=0
    )
    client.set(KEYS.weights_offer, encode(offer))
    registry = CollectorRegistry()
    follower = PolicyFollower(NoEngine(), client, KEYS, RolloutMetrics(registry), transfer_timeout=TIMEOUT_S)

    def failures() -> float:
        return registry.get_sample_value("gd2po_rollout_weight_transfer_failures_total")

    tried = []
    for _ in range(3):
        started = time.monotonic()
        assert not follower.sync()
        tried.append(failures())
        while failures() == tried[-1] and time.monotonic() - started < 10:
            follower.sync()  # paused: no transfer tried, the folder path only
            time.sleep(0.02)
        tried.append(time.monotonic() - started)
    # Attempt 1, pause 1 timeout; attempt 2, pause 2; attempt 3, pause 4: the same version each time.
    assert [tried[0], tried[2], tried[4]] == [1, 2, 3]
    pauses = tried[1], tried[3]
    assert TIMEOUT_S <= pauses[0] < 2 * TIMEOUT_S and 2 * TIMEOUT_S <= pauses[1] < 4 * TIMEOUT_S, pauses
    # Paused now (4 timeouts); an offer from another store (a restarted trainer) is tried at once.
    before = failures()
    assert not follower.sync() and failures() == before
    client.set(KEYS.weights_offer, encode(offer.model_copy(update={"port": free_port()})))
    assert not follower.sync() and failures() == before + 1
    client.close()
