"""``judge.openai`` end to end: the reward service calls a real OpenAI-compatible chat server (FastAPI
under uvicorn, started here). Replies it cannot read, out-of-range numbers and upstream failures become
item errors, never a score."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fastapi import FastAPI, Header, HTTPException
from live_server import serve

from reward_service.app import create_app
from reward_service.scorers import build_scorer
from reward_service.scorers.judge import parse_grade

KEY = "judge-key"


def judge_server(log: list[dict]) -> FastAPI:
    """A deterministic judge: the grade is the number of words in the answer (capped at 10), unless
    the answer asks for a misbehaviour the scorer must survive."""
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(body: dict, authorization: str | None = Header(default=None)) -> dict:
        if authorization != f"Bearer {KEY}":
            raise HTTPException(401, "bad key")
        log.append(body)
        answer = body["messages"][1]["content"].split("Answer:\n", 1)[1]
        if "CRASH" in answer:
            raise HTTPException(500, "judge exploded")
        if "SLOW" in answer:
            await asyncio.sleep(0.4)
        replies = {
            "RAMBLE": "This answer is thoughtful but I would rather not grade it.",
            "HUGE": "42",
            "NULL": None,
            "RUBRIC": "1. Accuracy: sound.\n2. Clarity: 8 of 10 sentences clear.\n3. Tone: fine.\nScore: 7",
            "SPLIT": "Somewhere between 3 and 9.",
        }
        words = len(answer.split())
        content = next((r for k, r in replies.items() if k in answer), f"Rating: {min(words, 10)}/10")
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}

    return app


@pytest.fixture(scope="module")
def judge():
    log: list[dict] = []
    with serve(judge_server(log)) as url:
        yield url, log


def judge_service(judge_url: str, **options):
    options = {"base_url": judge_url, "model": "grader-1", "api_key": KEY, **options}
    return serve(create_app(build_scorer("judge.openai", options)), ready_path="/readyz")


def item(item_id: str, completion: str) -> dict:
    prompt = [{"role": "user", "content": "Describe the sea."}]
    return {"id": item_id, "prompt": prompt, "completion": completion}


def test_grades_parse_into_scores_and_the_rubric_reaches_the_judge(judge) -> None:
    judge_url, log = judge
    with judge_service(judge_url) as url:
        results = httpx.post(
            f"{url}/v1/score",
            json={"items": [item("three", "blue and wide"), item("many", "word " * 30)]},
            timeout=30,
        ).json()["results"]
        info = httpx.get(f"{url}/v1/info").json()
    assert [(r["id"], r["score"], r["status"]) for r in results] == [
        ("three", 3.0, "ok"),
        ("many", 10.0, "ok"),
    ]
    assert info["model_id"] == "grader-1" and info["range"] == [1.0, 10.0]
    sent = next(body for body in log if "blue and wide" in body["messages"][1]["content"])
    assert sent["model"] == "grader-1" and sent["temperature"] == 0.0
    assert "from 1.0 to 10.0" in sent["messages"][0]["content"]
    assert "user: Describe the sea." in sent["messages"][1]["content"]


@pytest.mark.parametrize(
    ("completion", "reason"),
    [
        ("RAMBLE on", "no number"),
        ("HUGE", "outside"),
        ("NULL", "no number"),
        ("SPLIT", "ambiguous"),
        ("CRASH now", "500"),
    ],
)
def test_bad_judge_replies_are_item_errors_not_zeros(judge, completion: str, reason: str) -> None:
    with judge_service(judge[0]) as url:
        body = {"items": [item("bad", completion), item("good", "fine answer")]}
        bad, good = httpx.post(f"{url}/v1/score", json=body, timeout=30).json()["results"]
    assert bad["status"] == "error" and bad["score"] is None and reason in bad["error"]
    assert good == {"id": "good", "score": 2.0, "status": "ok", "error": None}


def test_a_rubric_numbered_answer_is_graded_by_its_final_score(judge) -> None:
    with judge_service(judge[0], max_tokens=64) as url:
        result = httpx.post(f"{url}/v1/score", json={"items": [item("r", "RUBRIC")]}, timeout=30).json()
    assert result["results"][0]["score"] == 7.0
    assert judge[1][-1]["max_tokens"] == 64


@pytest.mark.parametrize(
    ("reply", "grade"),
    [
        ("8", 8.0),
        ("8.5", 8.5),
        ("I'd give it an 8.", 8.0),
        ("Rating: 7/10", 7.0),
        ("6 / 10", 6.0),
        ("Verdict: [[9]] (strong).", 9.0),
        ("Score 3, but after review the final score is 4", 4.0),
        ("**Grade:** 5", 5.0),
        ("1. Helpful: yes\n2. Safe: yes\nOverall rating = 9", 9.0),
    ],
)
def test_parse_grade(reply: str, grade: float) -> None:
    assert parse_grade(reply) == grade


@pytest.mark.parametrize("reply", ["", "excellent", "1. helpful 2. safe", "between 3 and 9"])
def test_parse_grade_refuses_to_guess(reply: str) -> None:
    with pytest.raises(ValueError, match="no number|ambiguous"):
        parse_grade(reply)


def test_unreachable_judge_and_wrong_key_are_item_errors(judge) -> None:
    with judge_service(judge[0], api_key="wrong") as url:
        result = httpx.post(f"{url}/v1/score", json={"items": [item("a", "x")]}, timeout=30).json()
    assert result["results"][0]["status"] == "error" and "401" in result["results"][0]["error"]
    # Nothing listens on port 9 of localhost: the connection is refused.
    with judge_service("http://127.0.0.1:9", timeout=2.0) as url:
        result = httpx.post(f"{url}/v1/score", json={"items": [item("a", "x")]}, timeout=30).json()
    assert result["results"][0]["status"] == "error" and result["results"][0]["score"] is None


def test_openai_style_base_url_with_v1_suffix(judge) -> None:
    with judge_service(judge[0] + "/v1/") as url:
        result = httpx.post(f"{url}/v1/score", json={"items": [item("a", "two words")]}, timeout=30).json()
    assert result["results"][0]["score"] == 2.0


def test_items_are_judged_concurrently(judge) -> None:
    """Eight 0.4 s judge calls: serial would take 3.2 s; four at a time takes ~0.8 s."""
    with judge_service(judge[0], concurrency=4) as url:
        body = {"items": [item(f"s{k}", f"SLOW {'w ' * k}") for k in range(8)]}
        started = time.perf_counter()
        results = httpx.post(f"{url}/v1/score", json=body, timeout=30).json()["results"]
        elapsed = time.perf_counter() - started
    assert [r["score"] for r in results] == [float(min(k + 1, 10)) for k in range(8)]
    assert elapsed < 2.0
