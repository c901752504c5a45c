"""Tool-calling rewards of the GD²PO release (``tool-calling/verl/utils/reward_score/rlla.py``;
paraphrased in data/README.md §1.5): correctness in [−3, 3] with greedy partial credit, format 0/1
against the ground truth's block layout, think length / 512. Each scorer reads the completion as the
release does: after the last assistant-turn marker, before the next end-of-turn marker, stripped
(:func:`reward_service.chat_text.release_response`)."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from proto import RewardInfo, ScoreItem
from reward_service.chat_text import release_response
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


CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


class MalformedToolCall(ValueError):
    """The text has no call block the release can read (see :func:`parse_tool_calls`)."""


def _call_block(text: str) -> str:
    """What follows the first ``<tool_call>``, up to the next ``<tool_call>`` or ``</tool_call>``,
    whichever comes first (or the end of the text): the release cuts at both."""
    start = text.find(CALL_OPEN)
    if start < 0:
        raise MalformedToolCall(f"no {CALL_OPEN}")
    rest = text[start + len(CALL_OPEN) :]
    ends = [index for index in (rest.find(CALL_OPEN), rest.find(CALL_CLOSE)) if index >= 0]
    return rest[: min(ends)] if ends else rest


def _json_lines(block: str) -> list[Any]:
    """``json.loads`` of every line of the stripped block; a blank or non-JSON line raises."""
    try:
        return [json.loads(line) for line in block.strip().split("\n")]
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep for the parser
        raise MalformedToolCall(f"a line of the call block is not JSON: {exc}") from exc


def parse_tool_calls(text: str) -> list[Any]:
    """The JSON values of a response's call block, one per line, **unvalidated** (list of any JSON).

    The release's rule (``customize_correctness_reward_tool`` in ``tool-calling/verl/utils/
    reward_score/rlla.py``): the response must contain ``<tool_call>`` and ``</tool_call>`` somewhere
    (in any order); the block is the text after the first ``<tool_call>`` up to the next
    ``<tool_call>`` or ``</tool_call>``; it is stripped, split on ``"\\n"`` and every line must parse
    as JSON. What the values must look like is checked later, only where the scoring reads them
    (:func:`correctness_against`). Raises :class:`MalformedToolCall`.
    """
    if CALL_CLOSE not in text:
        raise MalformedToolCall(f"no {CALL_CLOSE}")
    return _json_lines(_call_block(text))


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
    """The ground truth's calls, or None when it has no ``<tool_call>`` (then correctness is 0).

    The block is cut as in :func:`parse_tool_calls` but, as in the release, the closing tag is not
    required. Unlike the release (which crashes the training step on an unparsable ground truth),
    a label that is not a list of ``{"name": str, "parameters": object}`` lines raises
    :class:`InvalidLabel` (HTTP 422 on the OpenRLHF route, an item error on ``/v1/score``).
    """
    if CALL_OPEN not in ground_truth:
        return None
    try:
        calls = _json_lines(_call_block(ground_truth))
    except MalformedToolCall as exc:
        raise InvalidLabel(f"the ground truth's <tool_call> block is malformed: {exc}") from exc
    for call in calls:
        if not (
            isinstance(call, dict)
            and isinstance(call.get("name"), str)
            and isinstance(call.get("parameters"), dict)
        ):
            raise InvalidLabel(
                'the ground truth\'s calls must be objects {"name": string, "parameters": object}'
            )
    return calls


def correctness(response: str, ground_truth: str) -> float:
    """+3 for the exact calls, −3 for unparsable ones, else 6·S/M − 3 with greedy partial credit."""
    return correctness_against(response, truth_calls(ground_truth))


def _readable(predicted: list[Any], truth: list[dict[str, Any]]) -> bool:
    """Whether the release's scoring reads ``predicted`` without raising (its catch-all gives −3).

    It reads ``call["name"]`` of every call (an object with a ``name`` is needed), counts the names
    when they differ from the ground truth's (they must be hashable: not arrays or objects), and reads
    ``call["parameters"].keys()`` only of calls named like a ground-truth call (it needs an object
    there). Other calls are never looked into further.
    """
    if not all(isinstance(call, dict) and "name" in call for call in predicted):
        return False
    names = [call["name"] for call in predicted]
    truth_names = {call["name"] for call in truth}
    if names != [call["name"] for call in truth] and any(isinstance(n, (list, dict)) for n in names):
        return False
    return all(
        isinstance(call.get("parameters"), dict)
        for call in predicted
        if isinstance(call["name"], str) and call["name"] in truth_names
    )


def correctness_against(response: str, truth: list[dict[str, Any]] | None) -> float:
    """:func:`correctness` with the ground truth already parsed by :func:`truth_calls`; a float in
    [−3, 3]. The release's ``customize_correctness_reward_tool`` + ``compute_tool_call_reward``:
    −3 if the call block is unreadable (:func:`parse_tool_calls`), +3 if the calls equal the ground
    truth's (whatever their shape), −3 if scoring them would raise in the release (:func:`_readable`),
    else 6·S/M − 3 with greedy partial credit (data/README.md §1.5, step 5)."""
    if truth is None:
        return 0.0
    try:
        predicted = parse_tool_calls(response)
    except MalformedToolCall:
        return CORRECT_MIN
    if truth == predicted:
        return CORRECT_MAX
    if not _readable(predicted, truth):
        return CORRECT_MIN
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
            return correctness_against(release_response(item.completion), parsed[label])

        return per_item(items, one)


@register_scorer("tool_call.format")
class ToolCallFormat(_ToolCallScorer):
    reward, bounds = "format", (0.0, 1.0)
    description = "1 if the completion's think/tool_call/response layout matches the ground truth's."

    def score(self, items: list[ScoreItem]) -> list[ItemScore]:
        return per_item(
            items,
            lambda item: format_reward(release_response(self._bounded(item).completion), _label(item)),
        )


@register_scorer("tool_call.length")
class ToolCallLength(_ToolCallScorer):
    reward, bounds = "length", (0.0, 1.0)
    description = "Words in the last <think> block / 512, capped at 1."

    def score(self, items: list[ScoreItem]) -> list[ItemScore]:
        return per_item(items, lambda item: think_length(release_response(self._bounded(item).completion)))
