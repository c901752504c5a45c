"""Scorer registry; importing this package registers every built-in scorer."""

from reward_service.scorers import generic, judge, reward_model, tool_call
from reward_service.scorers.base import SCORERS, Scorer, build_scorer, register_scorer

__all__ = [
    "SCORERS",
    "Scorer",
    "build_scorer",
    "generic",
    "judge",
    "register_scorer",
    "reward_model",
    "tool_call",
]
