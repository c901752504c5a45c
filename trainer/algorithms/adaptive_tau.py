"""Adaptive τ for GD²PO-SNR: a bounded integral controller that moves τ toward a target drop ratio.

Not in the paper or its release (both fix τ per run, paper §3.3 sweeps it): an extension of gd2po. Under
the release keep rule a conflicting rollout is dropped when |ρ| < τ, so the fraction of rollouts dropped,
``drop_ratio`` (docs/algorithm.md §4), rises monotonically with τ. After each step

    τ ← clip(τ + gain · (target − drop_ratio), tau_min, tau_max)

which raises τ while the filter drops less than the target and lowers it while it drops more. The fixed
point is the τ at which the expected drop ratio equals the target; the step's drop ratio is a noisy
estimate of it, and the integral averages that noise over steps (τ moves by at most ``gain`` per step).
Two limits, both bounded rather than fought: the drop ratio cannot exceed the conflict ratio (only
conflicting rollouts are dropped), so with fewer conflicts than the target τ settles at ``tau_max``; and
a batch without conflicts says nothing about τ, yet still pushes it up by ``gain · target`` — the clip at
``tau_max`` is what stops that wind-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class TauController:
    """τ for the next step and its update from the last step's drop ratio (see the module docstring).

    Attributes:
        target: drop ratio to reach, in [0, 1]. gain: τ change per unit of drop-ratio error (> 0).
        tau_min, tau_max: the bounds τ never leaves, 0 ≤ tau_min ≤ tau_max ≤ 1. tau: the current τ.

    Raises:
        ValueError: bounds outside [0, 1] or crossed, a target outside [0, 1], a gain ≤ 0 or non-finite,
            and (in `update`) a drop ratio that is not a finite number in [0, 1].
    """

    target: float
    gain: float
    tau_min: float
    tau_max: float
    tau: float

    def __post_init__(self) -> None:
        if not (0.0 <= self.tau_min <= self.tau_max <= 1.0):
            raise ValueError(f"need 0 <= tau_min <= tau_max <= 1, got [{self.tau_min}, {self.tau_max}]")
        if not 0.0 <= self.target <= 1.0:
            raise ValueError(f"target drop ratio must be in [0, 1], got {self.target}")
        if not (math.isfinite(self.gain) and self.gain > 0):
            raise ValueError(f"gain must be a finite number > 0, got {self.gain}")
        self.tau = self._clip(self.tau)

    def _clip(self, tau: float) -> float:
        return min(max(tau, self.tau_min), self.tau_max)

    def update(self, drop_ratio: float) -> float:
        """Move τ after a step whose filter dropped ``drop_ratio`` of the rollouts; returns the new τ."""
        if not (math.isfinite(drop_ratio) and 0.0 <= drop_ratio <= 1.0):
            raise ValueError(f"drop ratio must be a finite number in [0, 1], got {drop_ratio}")
        self.tau = self._clip(self.tau + self.gain * (self.target - drop_ratio))
        return self.tau
