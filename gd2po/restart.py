"""When ``gd2po up`` restarts a crashed child: bounded exponential backoff and a restart budget, the
rule of compose's ``restart: on-failure[:N]`` with Kubernetes' backoff reset.

A child "crashed" when it exited with a code other than 0 (a signal counts: ``-9`` after kill -9). Each
crash waits ``initial_s · factor^(streak-1)`` seconds, at most ``max_s``, before the restart; the streak
counts crashes since the child last ran ``stable_after_s`` without crashing, so a child that crashes
once a day always comes back after ``initial_s``, while a crash loop slows down. Every restart spends
one unit of the child's budget, ``max_restarts`` for the whole run: a crash with the budget spent stops
the run. Pure logic, no clock: the caller passes how long the child ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class RestartMode(StrEnum):
    """``gd2po up --restart``: restart crashed children (``on-failure``) or stop the run (``no``)."""

    ON_FAILURE = "on-failure"
    NO = "no"


@dataclass
class CrashHistory:
    """One child's restarts so far: the budget spent and the current crash streak."""

    restarts: int = 0
    """Restarts made for this child in this run."""
    streak: int = 0
    """Crashes since the child last ran ``RestartPolicy.stable_after_s`` (it sets the backoff)."""


@dataclass(frozen=True)
class RestartPolicy:
    """Backoff and budget of every child of one run. ``max_restarts=0`` is ``--restart no``."""

    max_restarts: int = 5
    """Restarts per child in the run; the next crash stops the run (compose's ``on-failure:N``)."""
    initial_s: float = 0.5
    """Seconds before the first restart of a streak: short enough that a restarted Redis is back while
    the services' own Redis retries still run (proto.redis_conn: about 2.5 s)."""
    factor: float = 2.0
    """Each further crash of a streak waits this many times longer."""
    max_s: float = 30.0
    """Longest wait before a restart."""
    stable_after_s: float = 60.0
    """A child that ran this long without crashing starts a new streak (backoff back to ``initial_s``);
    the budget is not refunded."""

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts={self.max_restarts}: must be 0 or more")
        if not 0 < self.initial_s <= self.max_s or self.factor < 1:
            raise ValueError("need 0 < initial_s <= max_s and factor >= 1")

    def delay(self, streak: int) -> float:
        """Seconds to wait before restarting after the ``streak``-th crash in a row (1 = the first)."""
        if streak < 1:
            raise ValueError(f"streak={streak}: the first crash is 1")
        # Exponent capped: the cap is reached long before, and factor**streak must not overflow.
        return min(self.max_s, self.initial_s * self.factor ** min(streak - 1, 64))

    def on_crash(self, history: CrashHistory, ran_s: float) -> float | None:
        """Record a crash of a child that ran ``ran_s`` seconds since its last start: the seconds to
        wait before restarting it, or None when its budget is spent (the run stops). Updates
        ``history`` only when it restarts."""
        if history.restarts >= self.max_restarts:
            return None
        history.streak = 1 if ran_s >= self.stable_after_s else history.streak + 1
        history.restarts += 1
        return self.delay(history.streak)


def policy_for(mode: RestartMode, max_restarts: int) -> RestartPolicy:
    """The policy of ``gd2po up --restart MODE --max-restarts N``; ``no`` restarts nothing."""
    return RestartPolicy(max_restarts=max_restarts if mode is RestartMode.ON_FAILURE else 0)
