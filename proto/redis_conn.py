"""One way to open Redis for every service: URL (``redis://`` or TLS ``rediss://``, ACL user in the
URL) plus the password from the environment, with health checks and retries on connection loss so a
Redis restart is survived."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from proto.config import RedisConfig


class _RetryButNotAuth(Retry):
    """Retry lost connections, but fail at once on a wrong password (a subclass of ConnectionError)."""

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):  # type: ignore[override]
        def retryable(error: Exception) -> bool:
            if isinstance(error, redis.AuthenticationError):
                return False
            return is_retryable(error) if is_retryable else True

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def connect(settings: RedisConfig, *, decode_responses: bool = False) -> redis.Redis:
    """A client for ``settings.url``; ``settings.password`` (from GD2PO_REDIS__PASSWORD) wins over the URL's."""
    password = settings.password.get_secret_value() if settings.password else None
    return redis.Redis.from_url(
        settings.url,
        password=password,
        decode_responses=decode_responses,
        health_check_interval=15,
        socket_keepalive=True,
        retry=_RetryButNotAuth(ExponentialBackoff(cap=1.0, base=0.05), retries=6),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )
