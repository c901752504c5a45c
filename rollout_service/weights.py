"""Follow the trainer's policy: between batches, receive the newest version over the trainer's process
group when one is offered (``trainer.publish.transport: broadcast``), else read the announcement key,
verify the folder's digest and reload in place. A bad folder or a failed transfer is refused (old weights
kept), logged and counted; the version served never goes backwards."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import redis

from proto import PolicyAnnouncement, WeightOffer, WeightRequest, decode, encode
from proto.keys import RedisKeys
from proto.weights import weights_digest
from rollout_service.engine import Engine
from rollout_service.metrics import RolloutMetrics

log = logging.getLogger("rollout_service.weights")


MAX_TRANSFER_PAUSES = 4
"""Longest pause after failed transfers, in transfer timeouts (4 × the default 60 s)."""


class WeightReloadError(RuntimeError):
    """The announced folder cannot be served; the engine keeps its current weights."""


class PolicyFollower:
    """``client=None`` (a serve-only rollout without Redis): no announcements, manual reloads only."""

    def __init__(
        self,
        engine: Engine,
        client: redis.Redis | None,
        keys: RedisKeys,
        metrics: RolloutMetrics,
        *,
        producer_id: str = "rollout",
        transfer_timeout: float = 60.0,
    ):
        self.engine, self.client, self.keys, self.metrics = engine, client, keys, metrics
        self.producer_id, self.transfer_timeout = producer_id, transfer_timeout
        self.version = 0
        self._refused: set[tuple[int, str]] = set()
        self._failures_in_a_row = 0  # failed transfers since the last one that worked
        self._failed_store: tuple[str, int] | None = None  # where the last failed transfer was offered
        self._transfers_paused_until = 0.0  # monotonic time; folders only until then, after a failure
        metrics.policy_version.set(0)

    def offered(self) -> WeightOffer | None:
        if self.client is None:
            return None
        raw = self.client.get(self.keys.weights_offer)
        return None if raw is None else decode(raw, WeightOffer)

    def announced(self) -> PolicyAnnouncement | None:
        if self.client is None:
            return None
        raw = self.client.get(self.keys.policy)
        return None if raw is None else decode(raw, PolicyAnnouncement)

    def newest_version(self) -> int:
        """The newest version the trainer has published, as a folder (announced) or only offered over a
        process group (``transport: broadcast`` between two ``disk_every`` folders); 0 before any."""
        published = [self.announced(), self.offered()]
        return max((p.version for p in published if p is not None), default=0)

    def sync(self) -> bool:
        """Receive or reload if a newer version is offered or announced; True if the weights changed. A
        failed transfer falls back to the newest folder, and no transfer is tried for ``transfer_timeout``
        seconds, doubling with each failure in a row up to :data:`MAX_TRANSFER_PAUSES` timeouts (folders
        only meanwhile): a trainer that cannot be reached would otherwise cost up to the timeout before
        every batch. The same version is tried again after the pause (a synchronous run waits for it); an
        offer from another store address (a restarted trainer) ends the pause."""
        offer = self.offered()
        if offer is not None and (offer.host, offer.port) != self._failed_store:
            self._failures_in_a_row, self._transfers_paused_until = 0, 0.0  # a new trainer: no pause
        if (
            offer is not None
            and offer.version > self.version
            and time.monotonic() >= self._transfers_paused_until
        ):
            if self.receive(offer):
                self._failures_in_a_row, self._failed_store = 0, None
                return True
            self._failed_store = (offer.host, offer.port)
            self._failures_in_a_row += 1
            pauses = min(2 ** (self._failures_in_a_row - 1), MAX_TRANSFER_PAUSES)
            self._transfers_paused_until = time.monotonic() + pauses * self.transfer_timeout
        announcement = self.announced()
        if announcement is None or announcement.version <= self.version:
            return False
        if (announcement.version, announcement.digest) in self._refused:
            return False
        try:
            self.load(Path(announcement.path), announcement.digest, announcement.version)
        except WeightReloadError as exc:
            self._refused.add((announcement.version, announcement.digest))
            log.error("keeping policy version %d: %s", self.version, exc)
            return False
        return True

    def receive(self, offer: WeightOffer) -> bool:
        """Ask the trainer for its newest version and receive it over a process group (the engine's worker
        extension); True when it is served now. Any failure is logged and counted, weights unchanged."""
        nonce = uuid.uuid4().hex
        started = time.perf_counter()
        try:
            request = WeightRequest(
                producer_id=self.producer_id,
                nonce=nonce,
                version=offer.version,
                created_at=time.time(),
                receivers=self.engine.tensor_parallel_size,
                backends=self.engine.transfer_backends,
            )
            self.client.rpush(self.keys.weights_requests, encode(request))
            result = self.engine.receive(offer.host, offer.port, nonce, self.transfer_timeout)
        except Exception as exc:  # the transfer's own errors, Redis, or the engine refusing the tensors
            self.metrics.transfer_failures.inc()
            log.warning(
                "receiving policy version %d from %s:%d failed, keeping version %d: %s",
                offer.version, offer.host, offer.port, self.version, exc,
            )  # fmt: skip
            return False
        seconds = time.perf_counter() - started
        self.version = max(self.version, int(result["version"]))
        self.metrics.policy_version.set(self.version)
        self.metrics.reload_seconds.observe(seconds)
        log.info(
            "serving policy version %d received from the trainer over %s (%.0f MiB in %.2f s)",
            self.version, result["backend"], result["bytes"] / 2**20, seconds,
        )  # fmt: skip
        return True

    def load(self, folder: Path, digest: str | None, version: int) -> None:
        """Verify then reload; any failure leaves the previous weights in place."""
        started = time.perf_counter()
        try:
            if digest is not None:
                actual = weights_digest(folder)
                if actual != digest:
                    raise WeightReloadError(f"{folder}: digest {actual[:19]}… does not match {digest[:19]}…")
            self.engine.reload(folder)
        except WeightReloadError:
            self.metrics.reload_failures.inc()
            raise
        except Exception as exc:
            self.metrics.reload_failures.inc()
            raise WeightReloadError(f"{folder}: {type(exc).__name__}: {exc}") from exc
        self.version = version
        self.metrics.policy_version.set(version)
        self.metrics.reload_seconds.observe(time.perf_counter() - started)
        log.info("serving policy version %d from %s", version, folder)
