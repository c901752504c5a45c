"""The OpenRLHF route scores only the response inside ``query`` (prompt + response as OpenRLHF decodes
it, padding and chat markers included), exactly as ``/v1/score`` scores that response; a query whose
prompt cannot be located is refused with 422, never scored with its prompt. Real uvicorn, real scorers.

Right values: the GD²PO release's format and correctness rules (``rlla.py``) on the response ``R``
alone: a well-formed call block matching the ground truth has format 1 and correctness +3."""

from __future__ import annotations

import httpx
import pytest
from live_server import serve

from reward_service.app import create_app
from reward_service.scorers import build_scorer

CALL = '{"name": "GetNews", "parameters": {"page": "1"}}'
TRUTH = "<think>x</think>\n<tool_call>\n" + CALL + "\n</tool_call>"
RESPONSE = "<think>the user wants news</think>\n<tool_call>\n" + CALL + "\n</tool_call>"
# SmolLM2's chat template (ChatML) with the generation prompt, as OpenRLHF renders it.
PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nnews please<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def urls():
    with (
        serve(create_app(build_scorer("tool_call.format")), ready_path="/readyz") as fmt,
        serve(create_app(build_scorer("tool_call.correctness")), ready_path="/readyz") as correct,
    ):
        yield {"format": fmt, "correctness": correct}


def _score(url: str, completion: str) -> float:
    item = {"id": "0", "prompt": "p", "completion": completion, "label": TRUTH}
    response = httpx.post(f"{url}/v1/score", json={"items": [item]})
    assert response.status_code == 200
    return response.json()["results"][0]["score"]


def _openrlhf(url: str, query: str, prompt: str | None) -> httpx.Response:
    body = {"query": [query], "labels": [TRUTH]} | ({"prompts": [prompt]} if prompt is not None else {})
    return httpx.post(f"{url}/v1/openrlhf", json=body)


@pytest.mark.parametrize(
    ("query", "prompt"),
    [
        (PROMPT + RESPONSE + "<|im_end|>", PROMPT),  # the case: was [0.0]
        ("<|endoftext|>" * 3 + PROMPT + RESPONSE, PROMPT),  # left padding: the whole query was scored
        ("<|im_end|>" * 2 + PROMPT + RESPONSE + "<|im_end|>" * 3, PROMPT),  # SmolLM2 pads with <|im_end|>
        ("<|endoftext|>" * 2 + PROMPT + RESPONSE + "<|im_end|>", "<|endoftext|>" + PROMPT),
        (PROMPT + RESPONSE + "<|im_end|>", None),  # no prompts: the assistant marker separates
    ],
    ids=["chatml", "left-padded", "smollm2-padding", "padded-prompt", "no-prompts"],
)
def test_openrlhf_scores_the_response_as_v1_score_scores_it(urls, query: str, prompt: str | None) -> None:
    for reward, right in (("format", 1.0), ("correctness", 3.0)):
        assert _score(urls[reward], RESPONSE) == right
        answer = _openrlhf(urls[reward], query, prompt)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"rewards": [right]}, reward


@pytest.mark.parametrize(
    ("query", "prompt"),
    [
        (PROMPT + '{"a": 1}<|im_end|>' + "<|endoftext|>" * 2, PROMPT),  # end of turn, right padding
        ("<|im_end|>" * 2 + PROMPT + '{"a": 1}<|im_end|>', None),  # SmolLM2 padding, no prompts
        (PROMPT + '{"a": 1}' + "<|endoftext|>" * 3, PROMPT),  # cut at max length: padding, no end of turn
    ],
    ids=["right-padded", "no-prompts", "no-end-of-turn"],
)
def test_any_scorer_gets_the_response_without_chat_or_padding_markers(query: str, prompt: str | None) -> None:
    """The cut is the route's, not only the tool-call scorers' own: strict JSON validity of the
    response ``{"a": 1}`` is 1, of the raw query 0."""
    with serve(create_app(build_scorer("generic.json_valid")), ready_path="/readyz") as url:
        assert _score(url, '{"a": 1}') == 1.0
        answer = _openrlhf(url, query, prompt)
    assert answer.status_code == 200 and answer.json() == {"rewards": [1.0]}


def test_prompt_text_is_never_scored(urls) -> None:
    """A plain-text prompt holding a perfect call, a response without one: −3 (the response's score),
    not +3 (the prompt's), whatever the padding in front."""
    prompt = "Example answer:\n" + RESPONSE + "\nNow you. Answer:"
    for padding in ("", "<|endoftext|>" * 4):
        answer = _openrlhf(urls["correctness"], padding + prompt + " no call today", prompt)
        assert answer.status_code == 200 and answer.json() == {"rewards": [-3.0]}


def test_a_prompt_that_cannot_be_located_is_refused_with_422(urls) -> None:
    elsewhere = _openrlhf(urls["format"], "something else" + PROMPT + RESPONSE, PROMPT)
    assert elsewhere.status_code == 422
    assert [e["loc"] for e in elsewhere.json()["detail"]] == [["body", "prompts", 0]]
    unmarked = _openrlhf(urls["format"], "news please " + RESPONSE, None)
    assert unmarked.status_code == 422
    assert [e["loc"] for e in unmarked.json()["detail"]] == [["body", "query", 0]]
    assert "send prompts" in unmarked.json()["detail"][0]["msg"]


def test_v1_score_reads_raw_chat_markers_as_the_release_does(urls) -> None:
    """Release (rlla.compute_score): after the last ``<|im_start|>assistant``, cut at the first
    ``<|im_end|>``, stripped. Here that is RESPONSE: format 1, correctness +3 (were 0 and +1 with
    the prompt's own call counted)."""
    with_prompt = PROMPT.replace(
        "news please", "<tool_call>\n" + CALL.replace('"1"', '"2"') + "\n</tool_call>"
    )
    completion = with_prompt + RESPONSE + "<|im_end|>\n<|im_start|>user\nthanks"
    assert _score(urls["format"], completion) == 1.0
    assert _score(urls["correctness"], completion) == 3.0
