"""The scorer contract and registry: a scorer turns a batch of items into one score or one error each."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from proto import RewardInfo, ScoreItem

ItemScore = float | Exception


class InvalidLabel(ValueError):
    """The item's label (ground truth) is missing or unusable: the client's mistake, not the scorer's,
    so routes that cannot report per-item errors answer 422 naming ``labels[i]``, not 503."""


SCORERS: dict[str, Callable[..., Scorer]] = {}


class Scorer(ABC):
    """One reward dimension. ``score`` isolates failures per item: an exception is that item's result.
    The service calls ``score`` in a worker thread, so it may block (models, network, CPU-heavy rules)."""

    version: ClassVar[str] = "1"

    def load(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Heavy initialisation (models); the service is ready only after it returns."""

    @abstractmethod
    def info(self) -> RewardInfo: ...

    @abstractmethod
    def score(self, items: list[ScoreItem]) -> list[ItemScore]: ...


def register_scorer(name: str) -> Callable[[Callable[..., Scorer]], Callable[..., Scorer]]:
    def register(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        if name in SCORERS:
            raise ValueError(f"scorer {name!r} is already registered")
        SCORERS[name] = factory
        return factory

    return register


def build_scorer(name: str, options: dict[str, Any] | None = None) -> Scorer:
    """Instantiate a registered scorer; unknown names and options fail with the valid choices."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; known: {sorted(SCORERS)}")
    try:
        return SCORERS[name](**(options or {}))
    except TypeError as exc:
        raise ValueError(f"bad options for scorer {name!r}: {exc}") from exc


def per_item(items: list[ScoreItem], fn: Callable[[ScoreItem], float]) -> list[ItemScore]:
    """Apply ``fn`` to each item, turning an exception into that item's result."""
    results: list[ItemScore] = []
    for item in items:
        try:
            results.append(fn(item))
        except Exception as exc:
            results.append(exc)
    return results
