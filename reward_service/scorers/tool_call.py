"""Tool-calling rewards of the GD²PO release (data/README.md §1.5): correctness in [−3, 3] with greedy
partial credit, format 0/1 against the ground truth's block layout, think length / 512."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from proto import RewardInfo, ScoreItem
from reward_service.scorers.base import InvalidLabel, ItemScore, Scorer, per_item, register_scorer

CORRECT_MAX, CORRECT_MIN = 3.0, -3.0
LENGTH_TARGET_WORDS = 512

_THINK = r"^<think>.*?</think>"
_FORMAT_RULES: dict[tuple[bool, bool], tuple[re.Pattern[str], tuple[str, ...]]] = {
    (True, False): (
        re.compile(_THINK + r"\n<tool_call>\n.*?\n</tool_call>$", re.DOTALL),
        ("<tool_call>", "</tool_call>"),
    ),
    (False, True): (
        re.compile(_THINK + r"\n<response>.*?</response>$", re.DOTALL),
        ("<response>", "</response>"),
    ),
    (True, True): (
        re.compile(_THINK + r"\n<tool_call>\n.*?\n</tool_call>\n<response>.*?</response>$", re.DOTALL),
        ("<tool_call>", "</tool_call>", "<response>", "</response>"),
    ),
    (False, False): (re.compile(_THINK + r"$", re.DOTALL), ()),
}


class MissingLabel(InvalidLabel):
    """The item has no ground truth; rule-based tool-calling rewards need one."""


def _label(item: ScoreItem) -> str:
    if item.label is None:
        raise MissingLabel(f"item {item.id!r}: label (the ground-truth completion) is required")
    return item.label


# What parse_tool_calls raises on text that is not a well-formed call block (nesting too deep for
# the JSON parser included).
_UNPARSABLE = (ValueError, KeyError, TypeError, RecursionError)


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """Calls between the first <tool_call> and the next </tool_call>, one JSON object per line.

    Raises on anything the release scores as a failure: a missing block, a line that is not JSON,
    a call without ``name`` or with non-dict ``parameters``.
    """
    start = text.index("<tool_call>") + len("<tool_call>")
    end = text.index("</tool_call>", start)
    calls = [json.loads(line) for line in text[start:end].strip().split("\n")]
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call["name"], str):
            raise ValueError("a call must be an object with a string 'name'")
        if not isinstance(call["parameters"], dict):
            raise ValueError("a call's 'parameters' must be an object")
    return calls


def match(a: list[Any], b: list[Any]) -> float:
    """1 for equal ordered lists, 0 if either is empty, else multiset Jaccard."""
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    common = sum((Counter(a) & Counter(b)).values())
    return common / (len(a) + len(b) - common)


def _call_credit(truth: dict[str, Any], candidate: dict[str, Any]) -> float:
    expected, given = truth["parameters"], candidate["parameters"]
    same_values = sum(1 for key, value in expected.items() if key in given and given[key] == value)
    return match(list(expected), list(given)) + same_values


def truth_calls(ground_truth: str) -> list[dict[str, Any]] | None:
    """The ground truth's calls, or None when it expects no call (then correctness is 0)."""
    if "<tool_call>" not in ground_truth:
        return None
    try:
        return parse_tool_calls(ground_truth)
    except _UNPARSABLE as exc:
        raise InvalidLabel(f"the ground truth's <tool_call> block is malformed: {exc}") from exc


def correctness(response: str, ground_truth: str) -> float:
    """+3 for the exact calls, −3 for unparsable ones, else 6·S/M − 3 with greedy partial credit."""
    return correctness_against(response, truth_calls(ground_truth))


def correctness_against(response: str, truth: list[dict[str, Any]] | None) -> float:
    """:func:`correctness` with the ground truth already parsed by :func:`truth_calls`."""
    if truth is None:
        return 0.0
    try:
        predicted = parse_tool_calls(response)
    except _UNPARSABLE:
        return CORRECT_MIN
    if truth == predicted:
        return CORRECT_MAX
    score = match([t["name"] for t in truth], [p["name"] for p in predicted])
    maximum = 1.0
    used: set[int] = set()
    for expected in truth:
        maximum += 1 + len(expected["parameters"])
        best_index, best_credit = -1, 0.0
        for index, candidate in enumerate(predicted):
            if index in used or candidate["name"] != expected["name"]:
                continue
            credit = _call_credit(expected, candidate)
            if credit > best_credit:
                best_index, best_credit = index, credit
        if best_index >= 0:
            score += best_credit
            used.add(best_index)
    return (CORRECT_MAX - CORRECT_MIN) * score / maximum + CORRECT_MIN


def format_reward(response: str, ground_truth: str) -> float:
    """1 if the response has exactly the ground truth's block layout, else 0."""
    kind = ("<tool_call>" in ground_truth, "<response>" in ground_truth)
    pattern, single_tags = _FORMAT_RULES[kind]
    if not pattern.search(response):
        return 0.0
    return float(all(response.count(tag) == 1 for tag in single_tags))


def think_length(response: str) -> float:
    """Words in the last think block / 512, rounded to 2 decimals, capped at 1."""
    if "<think>" not in response or "</think>" not in response:
        return 0.0
    thought = response.split("<think>")[-1].split("</think>")[0].strip()
    return min(1.0, round(len(thought.split()) / LENGTH_TARGET_WORDS, 2))


#: Bounded work per item: correctness matches every expected call against every given one and the
#: format rule's regex backtracks, both worse than linear. A completion or label longer than this, or
#: with more lines from its first <tool_call> on, is that item's error (scorer options ``max_chars``,
#: ``max_call_lines``); release-style completions are far below both.
MAX_SCORED_CHARS = 16_384
MAX_SCORED_CALL_LINES = 128


class TooLargeToScore(ValueError):
    """The item exceeds the size a tool-call reward scores (see MAX_SCORED_CHARS)."""


class _ToolCallScorer(Scorer):
    reward: str
    bounds: tuple[float, float]
    description: str

    def __init__(self, max_chars: int = MAX_SCORED_CHARS, max_call_lines: int = MAX_SCORED_CALL_LINES):
        if max_chars < 1 or max_call_lines < 1:
            raise ValueError("max_chars and max_call_lines must be positive")
        self.max_chars, self.max_call_lines = max_chars, max_call_lines

    def _bounded(self, item: ScoreItem) -> ScoreItem:
        """The item, if its size is within the caps; else raise (that item's error)."""
        for field, text in (("completion", item.completion), ("label", item.label or "")):
            if len(text) > self.max_chars:
                raise TooLargeToScore(
                    f"{field}: {len(text)} characters exceed the {self.max_chars} this reward scores"
                )
            start = text.find("<tool_call>")
            if start >= 0 and (lines := text.count("\n", start)) > self.max_call_lines:
                raise TooLargeToScore(
                    f"{field}: {lines} lines from <tool_call> on exceed the {self.max_call_lines} "
                    "this reward scores"
                )
        return item

    def info(self) -> RewardInfo:
        return RewardInfo(
            name=self.reward, version=self.version, range=self.bounds, description=self.description
        )


@register_scorer("tool_call.correctness")
class ToolCallCorrectness(_ToolCallScorer):
    reward, bounds = "correctness", (CORRECT_MIN, CORRECT_MAX)
    description = "Tool-call correctness vs the ground truth (GD²PO release rules), in [-3, 3]."

    def score(self, items: list[ScoreItem]) -> list[ItemScore]:
        # The G completions of a group share one label: parse each ground truth once per request.
        parsed: dict[str, list[dict[str, Any]] | None] = {}

        def one(item: ScoreItem) -> float:
            label = _label(self._bounded(item))
            if label not in parsed:
                parsed[label] = truth_calls(label)
            return correctness_against(item.completion.strip(), parsed[label])

        return per_item(items, one)


@register_scorer("tool_call.format")
class ToolCallFormat(_ToolCallScorer):
    reward, bounds = "format", (0.0, 1.0)
    description = "1 if the completion's think/tool_call/response layout matches the ground truth's."

    def score(self, items: list[ScoreItem]) -> list[ItemScore]:
        return per_item(
            items, lambda item: format_reward(self._bounded(item).completion.strip(), _label(item))
        )


@register_scorer("tool_call.length")
class ToolCallLength(_ToolCallScorer):
    reward, bounds = "length", (0.0, 1.0)
    description = "Words in the last <think> block / 512, capped at 1."

    def score(self, items: list[ScoreItem]) -> list[ItemScore]:
        return per_item(items, lambda item: think_length(self._bounded(item).completion.strip()))
