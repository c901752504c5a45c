"""API-Bank evaluation of tool calling (protocol of the GD²PO release, data/README.md §1.6).

Scoring is deliberately separate from generation: these pure functions score any model output, and
:mod:`gd2po.evaluate` produces outputs through any OpenAI-compatible server (the rollout service or
vLLM's own), greedy, with the model's chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEVELS = (1, 2, 3)
LENGTH_TARGET_WORDS = 512


@dataclass(frozen=True)
class Sample:
    sample_id: str
    level: int
    system: str
    user: str
    answer: dict[str, Any] | None


@dataclass(frozen=True)
class SampleScore:
    sample_id: str
    level: int
    correct: int | None
    format_valid: int
    length_score: float
    think_words: int


def _between(text: str, start: str, end: str) -> str | None:
    """Text between the first ``start`` and the next ``end`` after it, or None."""
    begin = text.find(start)
    if begin < 0:
        return None
    finish = text.find(end, begin + len(start))
    return None if finish < 0 else text[begin + len(start) : finish]


def normalise_answer(answer: Any) -> dict[str, Any] | None:
    """A list answer becomes its first element; anything but ``{name: str, parameters: dict}`` is None."""
    if isinstance(answer, list):
        answer = answer[0] if answer else None
    if (
        isinstance(answer, dict)
        and isinstance(answer.get("name"), str)
        and isinstance(answer.get("parameters"), dict)
    ):
        return answer
    return None


def load_level(path: Path, level: int) -> list[Sample]:
    items = json.loads(Path(path).read_text())
    return [
        Sample(f"Level{level}_{i}", level, item["system"], item["user"], normalise_answer(item["answer"]))
        for i, item in enumerate(items)
    ]


def load_api_bank(folder: Path) -> list[Sample]:
    return [s for level in LEVELS for s in load_level(Path(folder) / f"level-{level}.json", level)]


def parse_calls(text: str) -> list[Any]:
    """JSON objects inside the first tool_call block, one per line; unparsable lines are skipped."""
    block = _between(text, "<tool_call>", "</tool_call>")
    if block is None:
        return []
    calls = []
    for line in block.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            calls.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return calls


def call_correct(text: str, answer: dict[str, Any] | None) -> int | None:
    """1 if any parsed call equals the answer exactly (a bare parameter dict counts for its tool)."""
    if answer is None:
        return None
    try:
        for call in parse_calls(text):
            if "name" in call and "parameters" in call:
                if call["name"] == answer["name"] and call["parameters"] == answer["parameters"]:
                    return 1
            elif call == answer["parameters"]:
                return 1
    except (TypeError, AttributeError, KeyError):
        return 0
    return 0


def format_valid(text: str) -> int:
    """The evaluation's lenient layout rule (not the training format reward)."""
    text = text.strip()
    positions: dict[str, tuple[int, int]] = {}
    for tag in ("think", "tool_call", "response"):
        opens, closes = text.count(f"<{tag}>"), text.count(f"</{tag}>")
        if opens != closes or opens > 1:
            return 0
        if opens == 1:
            start, end = text.find(f"<{tag}>"), text.find(f"</{tag}>")
            if end < start:
                return 0
            positions[tag] = (start, end)
    if "think" not in positions or not ({"tool_call", "response"} & positions.keys()):
        return 0
    think_end = positions["think"][1]
    if any(positions[tag][0] < think_end for tag in ("tool_call", "response") if tag in positions):
        return 0
    if {"tool_call", "response"} <= positions.keys() and positions["response"][0] < positions["tool_call"][1]:
        return 0
    return 1


def think_words(text: str) -> int:
    thought = _between(text, "<think>", "</think>")
    return 0 if thought is None else len(thought.strip().split())


def length_score(text: str) -> float:
    if _between(text, "<think>", "</think>") is None:
        return 0.0
    return min(1.0, round(think_words(text) / LENGTH_TARGET_WORDS, 2))


def score_sample(sample: Sample, output: str) -> SampleScore:
    text = output.strip()
    return SampleScore(
        sample_id=sample.sample_id,
        level=sample.level,
        correct=call_correct(text, sample.answer),
        format_valid=format_valid(text),
        length_score=length_score(text),
        think_words=think_words(text),
    )


def summarise(scores: list[SampleScore]) -> dict[str, dict[str, float]]:
    """Per level and overall (micro-average): accuracy %, format pass-rate %, mean length, think words."""

    def block(rows: list[SampleScore]) -> dict[str, float]:
        scored = [r for r in rows if r.correct is not None]
        n = len(rows)
        return {
            "items": float(n),
            "accuracy": round(100.0 * sum(r.correct for r in scored) / len(scored), 2) if scored else 0.0,
            "format_pass_rate": round(100.0 * sum(r.format_valid for r in rows) / n, 2) if n else 0.0,
            "length_score": round(sum(r.length_score for r in rows) / n, 4) if n else 0.0,
            "think_words": round(sum(r.think_words for r in rows) / n, 2) if n else 0.0,
        }

    summary = {f"level-{level}": block([s for s in scores if s.level == level]) for level in LEVELS}
    summary = {name: values for name, values in summary.items() if values["items"]}
    summary["overall"] = block(scores)
    return summary
