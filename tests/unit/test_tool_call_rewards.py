"""Every worked vector of data/README.md §1.5 (computed with the authors' reward), plus edge cases."""

import pytest

from proto import ScoreItem
from reward_service.scorers import build_scorer
from reward_service.scorers.base import InvalidLabel
from reward_service.scorers.tool_call import correctness, format_reward, match, think_length

THINK_TOOL = (
    "<think> I should use the appropriate tool with proper parameters to respond to the user's need. </think>"
)
G1 = THINK_TOOL + '\n<tool_call>\n{"name": "GetNews", "parameters": {"page": "1"}}\n</tool_call>'
CALL = '{"name": "GetNews", "parameters": {"page": "1"}}'


def think(words: int) -> str:
    return "<think>" + " ".join(["word"] * words) + "</think>"


def call_block(*lines: str) -> str:
    return "<tool_call>\n" + "\n".join(lines) + "\n</tool_call>"


# (response, format, correctness, length) — the table of §1.5; length None = "–" (single-word think)
VECTORS = [
    ("exact call, 10-word think", think(10) + "\n" + call_block(CALL), 1, 3, 0.02),
    (
        "int instead of '1', 256-word think",
        think(256) + "\n" + call_block('{"name": "GetNews", "parameters": {"page": 1}}'),
        1,
        1,
        0.5,
    ),
    (
        "wrong tool name",
        think(1) + "\n" + call_block('{"name": "GetWeather", "parameters": {"page": "1"}}'),
        1,
        -3,
        0,
    ),
    (
        "extra param q",
        think(1) + "\n" + call_block('{"name": "GetNews", "parameters": {"page": "1", "q": "azure"}}'),
        1,
        2,
        0,
    ),
    (
        "right call + a second call page 2",
        think(1) + "\n" + call_block(CALL, '{"name": "GetNews", "parameters": {"page": "2"}}'),
        1,
        2,
        0,
    ),
    (
        "invalid JSON line",
        think(1) + "\n" + call_block('{"name": "GetNews", "parameters": {"page": "1"}'),
        1,
        -3,
        0,
    ),
    (
        "JSON pretty-printed over 2 lines",
        think(1) + "\n" + call_block('{"name": "GetNews",', '"parameters": {"page": "1"}}'),
        1,
        -3,
        0,
    ),
    ("<response> instead of a call", think(1) + "\n<response>Here is the news.</response>", 0, -3, 0),
    ("right call then a response", think(1) + "\n" + call_block(CALL) + "\n<response>ok</response>", 0, 3, 0),
    ("space instead of newline after </think>", think(1) + " " + call_block(CALL), 0, 3, 0),
    ("no think block", call_block(CALL), 0, 3, 0),
    ("600-word think + exact call", think(600) + "\n" + call_block(CALL), 1, 3, 1.0),
]


@pytest.mark.parametrize(
    ("case", "response", "fmt", "correct", "length"), VECTORS, ids=[v[0] for v in VECTORS]
)
def test_release_vectors(case: str, response: str, fmt: int, correct: int, length: float) -> None:
    assert format_reward(response, G1) == fmt
    assert correctness(response, G1) == pytest.approx(correct, abs=1e-12)
    assert think_length(response) == length


G2_CALLS = ['{"name": "A", "parameters": {"x": 1, "y": "b"}}', '{"name": "B", "parameters": {"z": "q"}}']
G2 = THINK_TOOL + "\n" + call_block(*G2_CALLS)


@pytest.mark.parametrize(
    ("calls", "expected"),
    [
        (list(reversed(G2_CALLS)), 3.0),  # swapped order: S = M
        (G2_CALLS[:1], 0.5),  # only A: S = 0.5 + 3, M = 6
        (['{"name": "A", "parameters": {"x": 2, "y": "b"}}', G2_CALLS[1]], 2.0),
        (['{"name": "A", "parameters": {"x": 1.0, "y": "b"}}', G2_CALLS[1]], 3.0),  # 1 == 1.0 in Python
    ],
)
def test_two_call_ground_truth(calls: list[str], expected: float) -> None:
    assert correctness(think(3) + "\n" + call_block(*calls), G2) == pytest.approx(expected)


def test_response_only_ground_truth_gives_zero_correctness_for_anything() -> None:
    truth = "<think> I should directly respond to the user's need. </think>\n<response> Hi </response>"
    for response in (think(2) + "\n<response>x</response>", call_block(CALL), "garbage"):
        assert correctness(response, truth) == 0.0
    assert format_reward(think(2) + "\n<response>x</response>", truth) == 1
    assert format_reward(think(2) + "\n" + call_block(CALL), truth) == 0


def test_length_uses_the_last_think_and_51_words_is_0_1() -> None:
    assert think_length(think(51)) == 0.1
    assert think_length(think(600) + " " + think(3)) == round(3 / 512, 2)
    assert think_length("<think> no closing tag") == 0.0


def test_format_counts_tags_exactly_once() -> None:
    twice = think(1) + "\n" + call_block(CALL + " <tool_call>")
    assert format_reward(twice, G1) == 0
    both = THINK_TOOL + "\n" + call_block(CALL) + "\n<response>ok</response>"
    assert format_reward(think(1) + "\n" + call_block(CALL) + "\n<response>ok</response>", both) == 1
    assert format_reward(think(1), "<think>x</think>") == 1  # neither block in the ground truth
    assert format_reward(think(1) + "\n", G1.split("\n<tool_call>")[0]) == 1  # $ allows one final newline


def test_greedy_assignment_uses_each_prediction_once_and_first_wins_ties() -> None:
    truth = THINK_TOOL + "\n" + call_block(CALL, CALL)
    one = think(1) + "\n" + call_block(CALL)
    # names: match([G,G],[G]) = 1/2; first truth call takes the only prediction (1 + 1), second finds none.
    assert correctness(one, truth) == pytest.approx(6 * (0.5 + 2) / 5 - 3)


def test_match_is_multiset_jaccard() -> None:
    assert match(["a", "b"], ["a", "b"]) == 1.0
    assert match(["a", "b"], ["b", "a"]) == 1.0  # multiset equal
    assert match([], ["a"]) == 0.0
    assert match([], []) == 1.0
    assert match(["a", "a", "b"], ["a", "c"]) == pytest.approx(1 / 4)


def test_parameters_not_an_object_or_missing_name_is_minus_three() -> None:
    for line in ('{"name": "GetNews", "parameters": ["1"]}', '{"parameters": {"page": "1"}}', "[1, 2]"):
        assert correctness(think(1) + "\n" + call_block(line), G1) == -3


def test_scorer_isolates_a_missing_label_as_an_item_error() -> None:
    scorer = build_scorer("tool_call.correctness")
    items = [
        ScoreItem(id="ok", prompt="p", completion=think(1) + "\n" + call_block(CALL), label=G1),
        ScoreItem(id="no-label", prompt="p", completion="x"),
        ScoreItem(id="bad-truth", prompt="p", completion="x", label="<tool_call>\nnot json\n</tool_call>"),
    ]
    ok, missing, bad = scorer.score(items)
    assert ok == 3.0
    assert isinstance(missing, ValueError) and "label" in str(missing)
    assert isinstance(bad, InvalidLabel) and "ground truth" in str(bad)


# Malformed shapes where gd2po was stricter than the release. Right values: the release's
# `compute_score` (tool-calling/verl/utils/reward_score/rlla.py, Qwen) run on each (response, truth):
# the block ends at the next <tool_call> or </tool_call>, </tool_call> may stand anywhere, and a
# call's shape is only checked where the scoring reads it (other-named calls need only a "name").
P2 = '{"name": "GetNews", "parameters": {"page": "2"}}'
G_ISSUE = "<think>x</think>\n" + call_block(CALL)
RELEASE_SHAPES = [
    # (case, response, truth, format, correctness)
    (
        "a second <tool_call> opens before the close",
        "<think>y</think>\n<tool_call>\n" + CALL + "\n" + call_block(P2),
        G_ISSUE,
        0,
        3,
    ),
    ("close tag before the open tag", "<think>y</think>\n</tool_call>\n<tool_call>\n" + CALL, G_ISSUE, 0, 3),
    ("no close tag anywhere", "<think>y</think>\n<tool_call>\n" + CALL, G_ISSUE, 0, -3),
    (
        "extra call of another name without parameters",
        think(1) + "\n" + call_block(CALL, '{"name": "Other"}'),
        G_ISSUE,
        1,
        2,
    ),
    (
        "extra call of another name, parameters a number",
        think(1) + "\n" + call_block(CALL, '{"name": "Other", "parameters": 5}'),
        G_ISSUE,
        1,
        2,
    ),
    (
        "extra call whose name is a number",
        think(1) + "\n" + call_block(CALL, '{"name": 5, "parameters": {}}'),
        G_ISSUE,
        1,
        2,
    ),
    (
        "extra call whose name is an array",
        think(1) + "\n" + call_block(CALL, '{"name": ["GetNews"]}'),
        G_ISSUE,
        1,
        -3,
    ),
    (
        "the right name without parameters",
        think(1) + "\n" + call_block('{"name": "GetNews"}'),
        G_ISSUE,
        1,
        -3,
    ),
    ("an extra line that is not an object", think(1) + "\n" + call_block(CALL, "7"), G_ISSUE, 1, -3),
    (
        "ground truth without its close tag",
        think(1) + "\n" + call_block(CALL),
        "<think>x</think>\n<tool_call>\n" + CALL,
        1,
        3,
    ),
]


@pytest.mark.parametrize(
    ("case", "response", "truth", "fmt", "correct"), RELEASE_SHAPES, ids=[v[0] for v in RELEASE_SHAPES]
)
def test_malformed_shapes_score_as_the_release_scores_them(
    case: str, response: str, truth: str, fmt: int, correct: int
) -> None:
    assert format_reward(response, truth) == fmt
    assert correctness(response, truth) == pytest.approx(correct, abs=1e-12)


def test_scorers_read_raw_chat_markers_as_the_release_does() -> None:
    """Release (rlla.compute_score, Qwen): the text after the last <|im_start|>assistant, cut at the
    first <|im_end|>, stripped. The prompt's own call (page 2) is not the response's."""
    response = think(3) + "\n" + call_block(CALL)
    completion = (
        "<|im_start|>user\n"
        + call_block(P2)
        + "<|im_end|>\n<|im_start|>assistant\n"
        + response
        + "<|im_end|>\n<|im_start|>user\nthanks"
    )
    item = ScoreItem(id="0", prompt="p", completion=completion, label=G1)
    expected = {"tool_call.correctness": 3.0, "tool_call.format": 1.0, "tool_call.length": 0.01}
    for name, right in expected.items():
        assert build_scorer(name).score([item]) == [right], name


def test_scorers_read_raw_llama3_markers_as_the_release_does() -> None:
    """Release (rlla.compute_score, Llama): after the last
    <|start_header_id|>assistant<|end_header_id|>, cut at the first <|eot_id|>, stripped."""
    completion = (
        "<|start_header_id|>user<|end_header_id|>\n\nnews<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n" + think(4) + "\n" + call_block(CALL)
    ) + "<|eot_id|><|end_of_text|>"
    item = ScoreItem(id="0", prompt="p", completion=completion, label=G_ISSUE)
    expected = {"tool_call.correctness": 3.0, "tool_call.format": 1.0, "tool_call.length": 0.01}
    for name, right in expected.items():
        assert build_scorer(name).score([item]) == [right], name
