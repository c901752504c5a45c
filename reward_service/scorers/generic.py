"""Generic scorers any task can use: closeness to a target length, a regex test, JSON validity."""

from __future__ import annotations

import json
import re

from proto import RewardInfo, ScoreItem
from reward_service.scorers.base import ItemScore, Scorer, per_item, register_scorer


@register_scorer("generic.length_target")
class LengthTarget(Scorer):
    """1 at the target length, falling linearly to 0 at ``tolerance`` units away (words or chars)."""

    def __init__(
        self, target: int = 256, tolerance: int | None = None, unit: str = "words", name: str = "length"
    ):
        if unit not in ("words", "chars"):
            raise ValueError("unit must be 'words' or 'chars'")
        if target <= 0:
            raise ValueError("target must be positive")
        if tolerance is not None and tolerance <= 0:
            raise ValueError("tolerance must be positive")
        self.target, self.unit, self.name = target, unit, name
        self.tolerance = target if tolerance is None else tolerance

    def info(self) -> RewardInfo:
        return RewardInfo(
            name=self.name,
            version=self.version,
            range=(0.0, 1.0),
            description=f"closeness to {self.target} {self.unit} (0 at ±{self.tolerance})",
        )

    def _one(self, item: ScoreItem) -> float:
        size = len(item.completion.split()) if self.unit == "words" else len(item.completion)
        return max(0.0, 1.0 - abs(size - self.target) / self.tolerance)

    def score(self, items: list[ScoreItem]) -> list[ItemScore]:
        return per_item(items, self._one)


@register_scorer("generic.regex")
class RegexMatch(Scorer):
    """1 if the pattern is found (or, with ``absent=True``, not found) in the completion."""

    def __init__(self, pattern: str, absent: bool = False, ignore_case: bool = False, name: str = "regex"):
        try:
            self.regex = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
        except re.error as exc:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from exc
        self.absent, self.name = absent, name

    def info(self) -> RewardInfo:
        verb = "absent" if self.absent else "present"
        return RewardInfo(
            name=self.name,
            version=self.version,
            range=(0.0, 1.0),
            description=f"/{self.regex.pattern}/ {verb}",
        )

    def score(self, items: list[ScoreItem]) -> list[ItemScore]:
        return per_item(
            items, lambda item: float((self.regex.search(item.completion) is None) == self.absent)
        )


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


@register_scorer("generic.json_valid")
class JsonValid(Scorer):
    """1 if the completion (stripped, optionally inside a ``json`` code fence) parses as strict JSON
    (RFC 8259: Python's extra ``NaN``/``Infinity`` literals do not count)."""

    _FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n```$", re.DOTALL)

    def __init__(self, name: str = "json_valid", require_object: bool = False):
        self.name, self.require_object = name, require_object

    def info(self) -> RewardInfo:
        return RewardInfo(name=self.name, version=self.version, range=(0.0, 1.0), description="valid JSON")

    def _one(self, item: ScoreItem) -> float:
        text = item.completion.strip()
        fenced = self._FENCE.match(text)
        try:
            value = json.loads(fenced.group(1) if fenced else text, parse_constant=_reject_constant)
        except ValueError:
            return 0.0
        return float(isinstance(value, dict) or not self.require_object)

    def score(self, items: list[ScoreItem]) -> list[ItemScore]:
        return per_item(items, self._one)
