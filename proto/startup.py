"""Start-up dependencies, checked before a service does heavy work: a missing one ends the process with
one line naming what is missing, where it was looked for and the setting that changes it — not a
traceback from deep inside a library after the model has loaded.

Redis and the reward services may still be starting beside this service (``gd2po up``, compose, Helm),
so they are waited for, but only for ``run.startup_timeout`` seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import httpx
import redis
from tenacity import (
    Retrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_delay,
    wait_exponential,
)

from proto.config import RedisConfig, RewardEndpoint, env_var, mask_url

log = logging.getLogger("proto.startup")


class StartupError(RuntimeError):
    """A start-up dependency is missing or unreachable; the message is one line saying what to change."""


def require_model(path: Path, key: str = "model.path") -> None:
    """A Hugging Face folder (``config.json`` + weights + tokenizer) must exist at ``path``."""
    if not (Path(path) / "config.json").is_file():
        raise StartupError(
            f"no model folder at {Path(path).resolve()} (no config.json); run `gd2po model prepare` or set "
            f"{key} / {env_var(key)}"
        )


def require_files(paths: Sequence[Path], key: str = "data.train_files") -> None:
    missing = [str(Path(p).resolve()) for p in paths if not Path(p).is_file()]
    if missing:
        raise StartupError(f"data file(s) not found: {', '.join(missing)}; set {key} / {env_var(key)}")


def _probe(settings: RedisConfig, timeout: float) -> redis.Redis:
    # No client-side retries: the wait below owns them, and each attempt must be short.
    password = settings.password.get_secret_value() if settings.password else None
    return redis.Redis.from_url(
        settings.url,
        password=password,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=None,
    )


def wait_for_redis(settings: RedisConfig, timeout: float) -> None:
    """Ping Redis until it answers, for at most ``timeout`` seconds; then raise :class:`StartupError`."""
    where = mask_url(settings.url)
    client = _probe(settings, timeout=min(2.0, max(timeout, 0.1)))
    try:
        for attempt in Retrying(
            stop=stop_after_delay(timeout),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            # A wrong password (a ConnectionError subclass) will not fix itself by waiting.
            retry=retry_if_exception_type((redis.ConnectionError, redis.TimeoutError))
            & retry_if_not_exception_type(redis.AuthenticationError),
            reraise=True,
        ):
            with attempt:
                client.ping()
    except redis.AuthenticationError as exc:
        raise StartupError(
            f"Redis at {where} refused the credentials ({exc}); set {env_var('redis.password')} "
            f"(and the user in redis.url / {env_var('redis.url')})"
        ) from None
    except redis.RedisError as exc:
        raise StartupError(
            f"cannot reach Redis at {where} after {timeout:g} s ({type(exc).__name__}: {exc}); start it or "
            f"set redis.url / {env_var('redis.url')}"
        ) from None
    finally:
        client.close()


def redis_reachable(settings: RedisConfig, timeout: float = 1.0) -> bool:
    """One short ping, for services that can run without Redis."""
    client = _probe(settings, timeout)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def wait_for_rewards(rewards: Sequence[RewardEndpoint], timeout: float) -> None:
    """At least one replica of every reward must answer HTTP (any status: a service still loading answers
    503, and servers other than gd2po's need no /healthz) within ``timeout`` seconds. Replicas that do not
    answer are logged and left to the rewards client, which retries away from them — a rollout (re)started
    while one replica is down serves, as the running one does (docs/architecture.md, failure model).
    Raises :class:`StartupError` naming the reward, its URLs and the setting to change."""
    for index, reward in enumerate(rewards):
        try:
            for attempt in Retrying(
                stop=stop_after_delay(timeout),
                wait=wait_exponential(multiplier=0.1, max=2.0),
                retry=retry_if_exception_type(httpx.TransportError),
                reraise=True,
            ):
                with attempt:
                    silent = _silent_replicas(reward.urls)
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            urls = ", ".join(mask_url(url) for url in reward.urls)
            raise StartupError(
                f"reward {reward.name!r}: nothing answers at {urls} after {timeout:g} s "
                f"({type(exc).__name__}); start it or set rewards[{index}].url / {env_var('rewards')}"
            ) from None
        if silent:
            log.warning(
                "reward %r: %d of %d replicas do not answer (%s); scoring goes to the others",
                reward.name, len(silent), len(reward.urls), ", ".join(mask_url(url) for url in silent),
            )  # fmt: skip


def _silent_replicas(urls: Sequence[str]) -> list[str]:
    """The URLs that do not answer; raises the last transport error when none does (InvalidURL at once)."""
    silent, error = [], None
    for url in urls:
        try:
            httpx.get(f"{url.rstrip('/')}/healthz", timeout=2.0)
        except httpx.TransportError as exc:
            silent.append(url)
            error = exc
    if len(silent) == len(urls) and error is not None:
        raise error
    return silent
