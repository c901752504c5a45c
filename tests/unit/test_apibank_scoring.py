"""API-Bank scoring rules (data/README.md §1.6) on hand-made outputs and on the real files."""

import json
from pathlib import Path

import pytest

from gd2po.apibank import (
    call_correct,
    format_valid,
    length_score,
    load_api_bank,
    normalise_answer,
    parse_calls,
    score_sample,
    summarise,
)

DATA = Path(__file__).resolve().parents[2] / "data" / "tool_calling" / "api_bank"
ANSWER = {
    "name": "ModifyRegistration",
    "parameters": {"appointment_id": "34567890", "new_appointment_date": "2023-03-26"},
}
CALL = '{"name": "ModifyRegistration", "parameters": {"appointment_id": "34567890", "new_appointment_date": "2023-03-26"}}'


def test_real_files_have_597_scorable_items() -> None:
    samples = load_api_bank(DATA)
    assert [sum(s.level == lvl for s in samples) for lvl in (1, 2, 3)] == [399, 67, 131]
    assert all(s.answer is not None for s in samples)
    assert samples[0].sample_id == "Level1_0" and samples[0].answer["name"] == "ModifyRegistration"
    assert all(isinstance(v, str) for s in samples for v in s.answer["parameters"].values())


def test_answer_normalisation() -> None:
    assert normalise_answer([ANSWER, {"name": "x", "parameters": {}}]) == ANSWER
    assert normalise_answer(ANSWER) == ANSWER
    assert normalise_answer({"name": 3, "parameters": {}}) is None
    assert normalise_answer([]) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"<think>x</think>\n<tool_call>\n{CALL}\n</tool_call>", 1),
        (f"<tool_call>\n{{bad json\n{CALL}\n</tool_call>", 1),  # bad lines are skipped, not fatal
        (
            f'<tool_call>\n{{"name": "Other", "parameters": {{}}}}\n{CALL}\n</tool_call>',
            1,
        ),  # extra calls are free
        (
            '<tool_call>\n{"appointment_id": "34567890", "new_appointment_date": "2023-03-26"}\n</tool_call>',
            1,
        ),
        (
            CALL.replace('"34567890"', "34567890").join(["<tool_call>\n", "\n</tool_call>"]),
            0,
        ),  # no normalisation
        (f"<tool_call>\n{CALL}\n", 0),  # unclosed block
        (f"<response>{CALL}</response>", 0),
        ("<tool_call>\n[1, 2]\n</tool_call>", 0),  # a non-dict call: exception while scanning gives 0
    ],
)
def test_call_correctness(text: str, expected: int) -> None:
    assert call_correct(text, ANSWER) == expected


def test_unscorable_answer_gives_none() -> None:
    assert call_correct(f"<tool_call>\n{CALL}\n</tool_call>", None) is None


def test_parse_takes_only_the_first_block() -> None:
    text = '<tool_call>\n{"a": 1}\n</tool_call> <tool_call>\n{"b": 2}\n</tool_call>'
    assert parse_calls(text) == [{"a": 1}]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>t</think><tool_call>x</tool_call>", 1),
        ("prefix <think>t</think> mid <response>r</response> tail", 1),
        ("<think>t</think><tool_call>x</tool_call><response>r</response>", 1),
        ("<think>t</think>", 0),  # needs a call or a response
        ("<tool_call>x</tool_call>", 0),  # needs a think
        (
            "<think>t</think><response>r</response><tool_call>x</tool_call>",
            0,
        ),  # response before the call ends
        ("<tool_call>x</tool_call><think>t</think>", 0),  # block before </think>
        ("<think>a</think><think>b</think><response>r</response>", 0),  # two thinks
        ("<think>t</think><response>r", 0),  # unbalanced
        ("</think>t<think><response>r</response>", 0),  # closes before it opens
    ],
)
def test_format_validity(text: str, expected: int) -> None:
    assert format_valid(text) == expected


def test_length_uses_the_first_think() -> None:
    words = " ".join(["w"] * 256)
    assert length_score(f"<think>{words}</think><think>x</think>") == 0.5
    assert length_score("<think>" + " ".join(["w"] * 51) + "</think>") == 0.1
    assert length_score("no think") == 0.0
    assert length_score("<think>" + " ".join(["w"] * 900) + "</think>") == 1.0


def test_summary_is_a_micro_average() -> None:
    samples = load_api_bank(DATA)
    level1, level3 = samples[0], next(s for s in samples if s.level == 3)
    good = "<think>ok</think>\n<tool_call>\n{}\n</tool_call>"
    scores = [
        score_sample(level1, good.replace("{}", json.dumps(level1.answer))),
        score_sample(level1, "nothing"),
        score_sample(level3, good.replace("{}", json.dumps(level3.answer))),
    ]
    summary = summarise(scores)
    assert summary["level-1"]["accuracy"] == 50.0
    assert summary["level-3"]["accuracy"] == 100.0
    assert summary["overall"]["accuracy"] == 66.67  # micro, not the mean of 50 and 100
    assert summary["overall"]["format_pass_rate"] == 66.67
    assert "level-2" not in summary
