"""Follow the trainer's policy: read the announcement key between batches, verify the folder's digest,
reload in place. A bad folder is refused (old weights kept), logged and counted."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import redis

from proto import PolicyAnnouncement, decode
from proto.keys import RedisKeys
from proto.weights import weights_digest
from rollout_service.engine import Engine
from rollout_service.metrics import RolloutMetrics

log = logging.getLogger("rollout_service.weights")


class WeightReloadError(RuntimeError):
    """The announced folder cannot be served; the engine keeps its current weights."""


class PolicyFollower:
    """``client=None`` (a serve-only rollout without Redis): no announcements, manual reloads only."""

    def __init__(self, engine: Engine, client: redis.Redis | None, keys: RedisKeys, metrics: RolloutMetrics):
        self.engine, self.client, self.keys, self.metrics = engine, client, keys, metrics
        self.version = 0
        self._refused: set[tuple[int, str]] = set()
        metrics.policy_version.set(0)

    def announced(self) -> PolicyAnnouncement | None:
        if self.client is None:
            return None
        raw = self.client.get(self.keys.policy)
        return None if raw is None else decode(raw, PolicyAnnouncement)

    def sync(self) -> bool:
        """Reload if a newer version is announced; True if the weights changed."""
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
