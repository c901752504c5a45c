"""Generic scorers: ``generic.length_target``, ``generic.regex``, ``generic.json_valid`` — worked cases
plus Hypothesis properties (peak at the target, monotone in distance, complement for ``absent``)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto import ScoreItem
from reward_service.scorers import build_scorer


def score(name: str, completion: str, **options) -> float:
    (value,) = build_scorer(name, options).score([ScoreItem(id="a", prompt="p", completion=completion)])
    assert isinstance(value, float), value
    return value


def words(n: int) -> str:
    return " ".join(["w"] * n)


@pytest.mark.parametrize(
    ("size", "expected"),
    [(10, 1.0), (5, 0.5), (15, 0.5), (8, 0.8), (0, 0.0), (20, 0.0), (31, 0.0)],
)
def test_length_target_worked_values(size: int, expected: float) -> None:
    assert score("generic.length_target", words(size), target=10) == pytest.approx(expected)


def test_length_target_in_characters_with_a_tolerance() -> None:
    assert score("generic.length_target", "x" * 100, target=100, tolerance=10, unit="chars") == 1.0
    assert score("generic.length_target", "x" * 95, target=100, tolerance=10, unit="chars") == 0.5
    assert score("generic.length_target", "x" * 89, target=100, tolerance=10, unit="chars") == 0.0
    # characters count the spaces, words do not
    assert score("generic.length_target", "a b", target=3, unit="chars") == 1.0


@pytest.mark.parametrize(
    "options",
    [{"target": 0}, {"target": 10, "tolerance": 0}, {"target": 10, "tolerance": -5}, {"unit": "tokens"}],
)
def test_length_target_rejects_bad_options(options: dict) -> None:
    with pytest.raises(ValueError):
        build_scorer("generic.length_target", options)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    target=st.integers(1, 60),
    tolerance=st.none() | st.integers(1, 60),
    a=st.integers(0, 150),
    b=st.integers(0, 150),
)
def test_length_target_peaks_at_target_and_falls_with_distance(
    target: int, tolerance: int | None, a: int, b: int
) -> None:
    options = {"target": target, "tolerance": tolerance}
    at_target = score("generic.length_target", words(target), **options)
    sa = score("generic.length_target", words(a), **options)
    sb = score("generic.length_target", words(b), **options)
    assert at_target == 1.0
    assert 0.0 <= sa <= 1.0
    if abs(a - target) <= abs(b - target):
        assert sa >= sb
    if abs(a - target) == abs(b - target):
        assert sa == pytest.approx(sb)  # symmetric around the target
    if a != target:
        assert sa < 1.0
    if abs(a - target) >= (tolerance or target):
        assert sa == 0.0


def test_regex_present_absent_and_case() -> None:
    assert score("generic.regex", "The answer is 42.", pattern=r"\b\d+\b") == 1.0
    assert score("generic.regex", "no digits", pattern=r"\d") == 0.0
    assert score("generic.regex", "no digits", pattern=r"\d", absent=True) == 1.0
    assert score("generic.regex", "I'm SORRY", pattern="sorry") == 0.0
    assert score("generic.regex", "I'm SORRY", pattern="sorry", ignore_case=True) == 1.0


def test_regex_bad_pattern_is_a_clear_option_error() -> None:
    with pytest.raises(ValueError, match="not a valid regular expression"):
        build_scorer("generic.regex", {"pattern": "(unclosed"})


@settings(max_examples=100, deadline=None, derandomize=True)
@given(text=st.text(max_size=80), needle=st.text(alphabet="abc", min_size=1, max_size=3))
def test_regex_absent_is_the_complement_of_present(text: str, needle: str) -> None:
    present = score("generic.regex", text, pattern=needle)
    absent = score("generic.regex", text, pattern=needle, absent=True)
    assert present == float(needle in text)
    assert present + absent == 1.0


@pytest.mark.parametrize(
    ("completion", "expected", "expected_object_only"),
    [
        ('{"a": 1}', 1.0, 1.0),
        ('  \n{"a": [1, 2, {"b": null}]}\n ', 1.0, 1.0),
        ('```json\n{"a": 1}\n```', 1.0, 1.0),
        ("```\n[1, 2]\n```", 1.0, 0.0),
        ("[1, 2]", 1.0, 0.0),
        ('"just a string"', 1.0, 0.0),
        ('{"a": 1', 0.0, 0.0),
        ("{'a': 1}", 0.0, 0.0),
        ('{"a": 1} trailing', 0.0, 0.0),
        ("NaN", 0.0, 0.0),
        ('{"x": Infinity}', 0.0, 0.0),
        ("", 0.0, 0.0),
        ('Here you go: {"a": 1}', 0.0, 0.0),
    ],
)
def test_json_valid_cases(completion: str, expected: float, expected_object_only: float) -> None:
    assert score("generic.json_valid", completion) == expected
    assert score("generic.json_valid", completion, require_object=True) == expected_object_only


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(value=JSON_VALUES, indent=st.none() | st.integers(0, 4), fence=st.booleans())
def test_json_valid_accepts_every_serialised_value(value: object, indent: int | None, fence: bool) -> None:
    text = json.dumps(value, indent=indent)
    if fence:
        text = f"```json\n{text}\n```"
    assert score("generic.json_valid", text) == 1.0
    assert score("generic.json_valid", text, require_object=True) == float(isinstance(value, dict))


@settings(max_examples=100, deadline=None, derandomize=True)
@given(value=st.dictionaries(st.text(max_size=8), JSON_VALUES, min_size=1, max_size=4))
def test_json_valid_rejects_a_truncated_object(value: dict) -> None:
    assert score("generic.json_valid", json.dumps(value)[:-1]) == 0.0
