"""Hostile requests to the reward service and the rollout's HTTP layer over real HTTP (uvicorn on
127.0.0.1) get a clear 4xx, never a 500: non-finite numbers anywhere (422), bodies that are not UTF-8
JSON (400/415), non-ASCII bearer credentials (401), OpenAI routes without the token (401) or too large
(413), reloads to impossible versions or foreign folders (422); and hostile work is bounded: a huge
tool-call item is that item's error, and a CPU-heavy scorer never stops /healthz from answering.

The rollout runs its real API over a stub engine (tests/rollout_stub.py): only HTTP is under test.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from live_server import serve
from rollout_stub import stub_rollout_app

from proto import RewardInfo, ScoreResponse
from reward_service.app import create_app
from reward_service.scorers import build_scorer
from reward_service.scorers.base import Scorer
from reward_service.scorers.tool_call import MAX_SCORED_CHARS

pytestmark = pytest.mark.integration
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
LABEL = '<think>x</think>\n<tool_call>\n{"name": "f", "parameters": {"a": 1}}\n</tool_call>'


@pytest.fixture(scope="module")
def reward_url():
    with serve(create_app(build_scorer("tool_call.correctness"), token=TOKEN), ready_path="/readyz") as url:
        yield url


@pytest.fixture(scope="module")
def weights_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run") / "weights"
    (root / "step-1").mkdir(parents=True)
    return root


@pytest.fixture(scope="module")
def rollout_url(weights_root: Path):
    with serve(stub_rollout_app(token=TOKEN, weights_root=weights_root), ready_path="/readyz") as url:
        yield url


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url, content=body, headers=AUTH if headers is None else headers, timeout=30)


def assert_422_naming(response: httpx.Response, name: str) -> None:
    assert response.status_code == 422, response.text
    detail = json.loads(response.text, parse_constant=lambda c: pytest.fail(f"{c} in the answer"))
    assert name in json.dumps(detail), detail


@pytest.mark.parametrize(
    ("service", "path", "body", "name"),
    [
        ("reward", "/v1/score", b'{"items":[{"id":"1","prompt":"p","completion":NaN}]}', "json_invalid"),
        ("reward", "/v1/openrlhf", b'{"query":["x"],"labels":[NaN]}', "json_invalid"),
        ("reward", "/v1/openrlhf", b'{"query":["x"],"labels":[-Infinity]}', "json_invalid"),
        (
            "reward",
            "/v1/score",
            b'{"items":[{"id":"1","prompt":"p","completion":"c","label":"l","metadata":{"x":[1e400]}}]}',
            "items.0.metadata.x.0",
        ),
        ("rollout", "/v1/completions", b'{"prompt":"x","temperature":NaN}', "json_invalid"),
        ("rollout", "/v1/completions", b'{"prompt":"x","temperature":1e400}', "temperature"),
        ("rollout", "/v1/completions", b'{"prompt":"x","ignored_extra":-1E+999}', "ignored_extra"),
        ("rollout", "/v1/chat/completions", b'{"messages":[],"top_p":Infinity}', "json_invalid"),
    ],
)
def test_non_finite_numbers_anywhere_get_422_naming_the_field(
    service: str, path: str, body: bytes, name: str, reward_url: str, rollout_url: str
) -> None:
    base = reward_url if service == "reward" else rollout_url
    assert_422_naming(post(base + path, body), name)


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("application/msgpack", bytes.fromhex("81a56974656d7390"), 415),
        ("text/plain", b"\xff\xfe", 415),
        (None, b"\xff\xfe", 415),
        ("application/json", b"\xff\xfe", 400),
        ("application/json", b'{"items":[{"id":"\xff"}]}', 400),
    ],
)
@pytest.mark.parametrize(
    ("service", "path"),
    [
        ("reward", "/v1/score"),
        ("reward", "/v1/openrlhf"),
        ("rollout", "/v1/completions"),
        ("rollout", "/v1/chat/completions"),
        ("rollout", "/v1/weights/reload"),
    ],
)
def test_bodies_that_are_not_utf8_json_get_400_or_415(
    service: str,
    path: str,
    content_type: str | None,
    body: bytes,
    status: int,
    reward_url: str,
    rollout_url: str,
) -> None:
    base = reward_url if service == "reward" else rollout_url
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if content_type:
        headers["Content-Type"] = content_type
    response = post(base + path, body, headers)
    assert response.status_code == status, response.text
    assert response.json()["detail"]


@pytest.mark.parametrize(
    ("service", "path"),
    [("reward", "/v1/score"), ("rollout", "/v1/completions"), ("rollout", "/v1/weights/reload")],
)
def test_a_non_ascii_bearer_credential_gets_401(
    service: str, path: str, reward_url: str, rollout_url: str
) -> None:
    base = reward_url if service == "reward" else rollout_url
    headers = {"Authorization": "Bearer été".encode(), "Content-Type": b"application/json"}
    response = httpx.post(base + path, content=b"{}", headers=headers)
    assert response.status_code == 401, response.text


def test_a_non_ascii_token_is_compared_as_utf8(tmp_path: Path) -> None:
    with serve(create_app(build_scorer("tool_call.length"), token="été"), ready_path="/readyz") as url:
        body = {"items": [{"id": "1", "prompt": "p", "completion": "<think>a b</think>", "label": "x"}]}
        right = {"Authorization": "Bearer été".encode()}
        assert httpx.post(f"{url}/v1/score", json=body, headers=right).status_code == 200
        wrong = {"Authorization": "Bearer ete"}
        assert httpx.post(f"{url}/v1/score", json=body, headers=wrong).status_code == 401


def test_openai_routes_demand_the_token_and_limit_the_body(rollout_url: str) -> None:
    completion = {"prompt": "x", "max_tokens": 2}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(f"{rollout_url}/v1/completions", json=completion).status_code == 401
    assert httpx.post(f"{rollout_url}/v1/chat/completions", json=chat).status_code == 401
    assert httpx.get(f"{rollout_url}/v1/models").status_code == 401
    assert httpx.post(f"{rollout_url}/v1/completions", json=completion, headers=AUTH).status_code == 200
    assert httpx.post(f"{rollout_url}/v1/chat/completions", json=chat, headers=AUTH).status_code == 200
    assert httpx.get(f"{rollout_url}/v1/models", headers=AUTH).status_code == 200
    # The reward service's limit (16 MiB), whether announced by Content-Length or streamed in chunks.
    huge = json.dumps({"prompt": "x" * (16 * 1024 * 1024 + 1)}).encode()
    assert post(f"{rollout_url}/v1/completions", huge).status_code == 413
    chunks = (huge[i : i + 65536] for i in range(0, len(huge), 65536))
    streamed = httpx.post(f"{rollout_url}/v1/completions", content=chunks, headers=AUTH, timeout=30)
    assert streamed.status_code == 413


def test_reload_refuses_impossible_versions_and_folders_outside_the_weights_root(
    rollout_url: str, weights_root: Path, tmp_path: Path
) -> None:
    reload = f"{rollout_url}/v1/weights/reload"
    step = str(weights_root / "step-1")

    def call(**body) -> httpx.Response:
        return httpx.post(reload, json=body, headers=AUTH)

    assert_422_naming(call(path=step, version=10**30), "version")
    assert_422_naming(call(path=str(tmp_path)), "path")
    assert_422_naming(call(path=str(weights_root / ".." / ".." / "elsewhere")), "path")
    assert_422_naming(call(path=step + "\x00"), "path")  # resolving it would raise: no 500
    first = call(path=step)
    assert first.status_code == 200 and first.json()["version"] >= 1
    current = first.json()["version"]
    assert_422_naming(call(path=step, version=current), "not newer")
    assert call(path=step, version=current + 1).status_code == 200
    back = call(path=step, version=0, rollback=True)
    assert back.status_code == 200 and back.json()["version"] == 0


def test_a_huge_tool_call_item_is_that_items_error_and_costs_little(reward_url: str) -> None:
    truth = "\n".join(json.dumps({"name": "f", "parameters": {"a": i}}) for i in range(300))
    given = "\n".join(json.dumps({"name": "f", "parameters": {"a": -i, "b": i}}) for i in range(3000))
    label = f"<think>x</think>\n<tool_call>\n{truth}\n</tool_call>"
    huge = f"<think>x</think>\n<tool_call>\n{given}\n</tool_call>"  # ~150 kB: seconds of matching uncapped
    items = [
        {"id": "huge", "prompt": "p", "completion": huge, "label": label},
        {"id": "fine", "prompt": "p", "completion": LABEL, "label": LABEL},
    ]
    started = time.perf_counter()
    response = httpx.post(f"{reward_url}/v1/score", json={"items": items}, headers=AUTH, timeout=60)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200
    results = {r.id: r for r in ScoreResponse.model_validate(response.json()).results}
    assert results["huge"].status == "error" and results["huge"].score is None
    assert f"exceed the {MAX_SCORED_CHARS}" in results["huge"].error
    assert results["fine"].status == "ok" and results["fine"].score == 3.0
    assert elapsed < 1.0


class _CPUHeavy(Scorer):
    """Pure-Python work for ~3 s per batch, as an expensive rule-based scorer would do."""

    def info(self) -> RewardInfo:
        return RewardInfo(name="heavy", version="1")

    def score(self, items):
        deadline = time.perf_counter() + 3.0
        while time.perf_counter() < deadline:
            sum(range(1000))
        return [1.0 for _ in items]


def test_health_checks_answer_while_a_cpu_heavy_scorer_works() -> None:
    with serve(create_app(_CPUHeavy()), ready_path="/readyz") as url:
        body = {"items": [{"id": "1", "prompt": "p", "completion": "c"}]}
        worker = threading.Thread(target=lambda: httpx.post(f"{url}/v1/score", json=body, timeout=30))
        worker.start()
        time.sleep(0.5)
        started = time.perf_counter()
        health = httpx.get(f"{url}/healthz", timeout=10)
        answered_in = time.perf_counter() - started
        worker.join()
        assert health.status_code == 200
        assert answered_in < 1.0  # not after the 3 s batch
