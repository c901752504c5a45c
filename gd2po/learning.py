"""Did the policy learn? One rule for the learning test, the run summary and the benchmarks.

A reward curve (one mean per step) *rose* when the mean of its last quarter of steps exceeds the mean
of its first quarter by more than ``threshold`` pooled standard deviations of the per-step means within
those two quarters. The margin comes from the run's own step-to-step noise, not from a hand-picked
constant: a flat curve with noisy steps needs a larger rise to count.

How often a curve that does not learn still "rose" (simulated, 20,000 curves each; the pooled sd is
itself estimated, so these are t-like tails): independent noise 0.7 % at 20 steps, 0.03 % at 40, none
seen at 64; noise correlated from step to step (AR(1), 0.5) 5 % at 20 steps, 1.4 % at 40, 0.2 % at 64;
a random walk about 30 % at any length. So the verdict is shown from :data:`MIN_STEPS` on, and a policy
that drifts at random (a trainer that moves it without regard to the rewards) can pass by chance: the
learning test pairs it with a run whose policy never reaches the rollout and checks each reward too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

RISE_THRESHOLD_SD = 2.0
MIN_STEPS = 16  # below this a flat curve passes too often (9 % at 8 steps) for a verdict to be shown


@dataclass(frozen=True)
class Rise:
    """First- vs last-quarter comparison of a per-step curve."""

    first: float  # mean of the first quarter of steps
    last: float  # mean of the last quarter of steps
    pooled_sd: float  # sqrt of the mean of the two quarters' sample variances
    quarter: int  # steps per quarter

    @property
    def delta(self) -> float:
        return self.last - self.first

    @property
    def in_sd(self) -> float:
        """The rise in pooled standard deviations (inf for a noiseless rise, 0 for none)."""
        if self.pooled_sd > 0:
            return self.delta / self.pooled_sd
        return math.inf if self.delta > 0 else (-math.inf if self.delta < 0 else 0.0)

    def rose(self, threshold: float = RISE_THRESHOLD_SD) -> bool:
        return self.delta > threshold * self.pooled_sd and self.delta > 0

    def describe(self) -> str:
        return (
            f"{self.first:+.4f} → {self.last:+.4f} (Δ {self.delta:+.4f} = {self.in_sd:+.1f} pooled sd, "
            f"quarters of {self.quarter} steps)"
        )


def _variance(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def quarters(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """The first and the last quarter of ``values`` (at least one value each)."""
    quarter = max(1, len(values) // 4)
    return list(values[:quarter]), list(values[-quarter:])


def quarter_rise(values: Sequence[float]) -> Rise:
    """Compare the first and last quarter of ``values`` (per-step means, in step order).

    Raises ValueError with fewer than 8 values (each quarter needs two steps for a variance)."""
    if len(values) < 8:
        raise ValueError(f"need at least 8 steps to compare quarters, got {len(values)}")
    head, tail = quarters(values)
    pooled = math.sqrt((_variance(head) + _variance(tail)) / 2)
    return Rise(sum(head) / len(head), sum(tail) / len(tail), pooled, len(head))


def normalised_total(
    reward_means: Mapping[str, Sequence[float]], ranges: Mapping[str, tuple[float, float]]
) -> list[float]:
    """Per step, the sum over rewards of (mean − low) / (high − low): every reward counts on the same
    [0, 1] scale, so a rise in a [−3, 3] reward does not drown a fall in a [0, 1] one.

    ``ranges`` maps each reward to its declared (low, high) (a reward service's ``/v1/info``); a reward
    without one, or with an empty range, is scaled by the range its own curve covers."""
    steps = min(len(v) for v in reward_means.values())
    total = [0.0] * steps
    for name, values in reward_means.items():
        low, high = ranges.get(name, (min(values), max(values)))
        if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
            low, high = min(values), max(values)
        span = (high - low) or 1.0
        for index in range(steps):
            total[index] += (values[index] - low) / span
    return total


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` steps (shorter at the start), same length as ``values``."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value - (values[index - window] if index >= window else 0.0)
        out.append(total / min(index + 1, window))
    return out


def first_reach(
    reward_means: Mapping[str, Sequence[float]], targets: Mapping[str, float], window: int
) -> int | None:
    """The first step (1-based) at which the trailing mean over ``window`` steps of every reward named in
    ``targets`` is at or above its target, or None when that never happens. The window keeps one lucky
    batch from counting as reached; the first ``window − 1`` steps average fewer steps. Raises KeyError
    for a target on a reward without a curve."""
    smoothed = {name: moving_average(list(reward_means[name]), window) for name in targets}
    steps = min(len(values) for values in smoothed.values())
    for index in range(steps):
        if all(smoothed[name][index] >= target for name, target in targets.items()):
            return index + 1
    return None
