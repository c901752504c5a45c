"""The reward service over real HTTP (uvicorn on 127.0.0.1): contract, per-item errors, limits, auth,
metrics, the OpenRLHF route, and the CLI process with graceful shutdown."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from live_server import serve
from prometheus_client.parser import text_string_to_metric_families

from gd2po.ports import free_port
from proto import ScoreResponse
from reward_service.app import create_app
from reward_service.scorers import build_scorer
from reward_service.scorers.base import Scorer
from reward_service.settings import ServiceSettings

G1 = '<think>x</think>\n<tool_call>\n{"name": "GetNews", "parameters": {"page": "1"}}\n</tool_call>'
GOOD = '<think>ok</think>\n<tool_call>\n{"name": "GetNews", "parameters": {"page": "1"}}\n</tool_call>'


def items(n: int, **extra) -> list[dict]:
    return [{"id": f"i{k}", "prompt": "p", "completion": GOOD, "label": G1, **extra} for k in range(n)]


def metric_value(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


@pytest.fixture(scope="module")
def correctness_url():
    with serve(create_app(build_scorer("tool_call.correctness")), ready_path="/readyz") as url:
        yield url


def test_scores_a_batch_and_reports_info(correctness_url: str) -> None:
    body = {"items": [*items(2), {"id": "bad", "prompt": "p", "completion": "no call", "label": G1}]}
    response = httpx.post(f"{correctness_url}/v1/score", json=body)
    assert response.status_code == 200
    parsed = ScoreResponse.model_validate(response.json())
    assert parsed.reward == "correctness"
    assert [(r.id, r.score, r.status) for r in parsed.results] == [
        ("i0", 3.0, "ok"),
        ("i1", 3.0, "ok"),
        ("bad", -3.0, "ok"),
    ]
    info = httpx.get(f"{correctness_url}/v1/info").json()
    assert info["name"] == "correctness" and info["range"] == [-3.0, 3.0]


def test_a_group_sharing_one_label_scores_like_items_scored_alone(correctness_url: str) -> None:
    from reward_service.scorers.tool_call import correctness

    wrong_type = GOOD.replace('"1"', "1")
    completions = [GOOD, wrong_type, "no call", GOOD.replace('{"page": "1"}', "{}"), wrong_type, GOOD]
    group = [{"id": f"g{k}", "prompt": "p", "completion": c, "label": G1} for k, c in enumerate(completions)]
    bad_truth = {"id": "bad", "prompt": "p", "completion": GOOD, "label": "<tool_call>\nnope\n</tool_call>"}
    results = httpx.post(f"{correctness_url}/v1/score", json={"items": [*group, bad_truth]}).json()["results"]
    assert [r["score"] for r in results[:-1]] == [correctness(c, G1) for c in completions]
    assert len({r["score"] for r in results[:-1]}) == 4
    assert results[-1]["status"] == "error" and results[-1]["score"] is None


def test_a_failing_item_is_an_error_never_a_zero(correctness_url: str) -> None:
    body = {"items": [*items(1), {"id": "nolabel", "prompt": "p", "completion": GOOD}]}
    results = httpx.post(f"{correctness_url}/v1/score", json=body).json()["results"]
    assert results[0]["status"] == "ok"
    assert results[1] == {"id": "nolabel", "score": None, "status": "error", "error": results[1]["error"]}
    assert "label" in results[1]["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"items": [{"id": "a", "prompt": "p"}]}, "completion"),
        ({"items": [{"id": "", "prompt": "p", "completion": "c"}]}, "id"),
        ({"items": []}, "items"),
        ({"itemz": []}, "items"),
        ({"items": [{"id": "a", "prompt": "p", "completion": "c", "colour": 1}]}, "colour"),
    ],
)
def test_malformed_requests_get_422_naming_the_field(correctness_url: str, body: dict, field: str) -> None:
    response = httpx.post(f"{correctness_url}/v1/score", json=body)
    assert response.status_code == 422
    assert any(field in [str(part) for part in error["loc"]] for error in response.json()["detail"])


def test_oversized_batch_and_body_get_413() -> None:
    app = create_app(
        build_scorer("tool_call.length"), ServiceSettings(max_batch_items=4, max_body_bytes=2048)
    )
    with serve(app, ready_path="/readyz") as url:
        too_many = httpx.post(f"{url}/v1/score", json={"items": items(5)})
        assert too_many.status_code == 413 and "items" in too_many.json()["detail"]
        huge = httpx.post(
            f"{url}/v1/score", json={"items": [{"id": "a", "prompt": "p", "completion": "x" * 5000}]}
        )
        assert huge.status_code == 413
        assert httpx.post(f"{url}/v1/score", json={"items": items(4)}).status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert metric_value(metrics, "gd2po_reward_rejected_total", reason="batch_too_large") == 1
        assert metric_value(metrics, "gd2po_reward_rejected_total", reason="body_too_large") == 1


def test_streamed_body_over_the_limit_gets_413_without_content_length() -> None:
    app = create_app(build_scorer("tool_call.length"), ServiceSettings(max_body_bytes=2048))

    def chunks():
        yield b'{"items": [{"id": "a", "prompt": "p", "completion": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}]}'

    with serve(app, ready_path="/readyz") as url:
        # A generator body goes out with Transfer-Encoding: chunked, announcing no length.
        streamed = httpx.post(
            f"{url}/v1/score", content=chunks(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413 and "2048" in streamed.json()["detail"]
        small = httpx.post(
            f"{url}/v1/score",
            content=iter([b'{"items": ', b'[{"id": "a", "prompt": "p", "completion": "c"}]}']),
            headers={"content-type": "application/json"},
        )
        assert small.status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert metric_value(metrics, "gd2po_reward_rejected_total", reason="body_too_large") == 1
        assert metric_value(metrics, "gd2po_reward_requests_total", route="/v1/score", code="413") == 1


def test_invalid_json_is_a_422_and_unknown_paths_add_no_metric_series(correctness_url: str) -> None:
    broken = httpx.post(
        f"{correctness_url}/v1/score", content=b'{"items": [', headers={"content-type": "application/json"}
    )
    assert broken.status_code == 422 and broken.json()["detail"][0]["type"] == "json_invalid"
    for k in range(5):
        assert httpx.get(f"{correctness_url}/v1/nothing-{k}").status_code == 404
    text = httpx.get(f"{correctness_url}/metrics").text
    assert "nothing-" not in text
    assert metric_value(text, "gd2po_reward_requests_total", route="/v1/score", code="422") >= 1


def test_bearer_token_protects_scoring_not_health() -> None:
    with serve(create_app(build_scorer("tool_call.length"), token="s3cret"), ready_path="/readyz") as url:
        assert httpx.post(f"{url}/v1/score", json={"items": items(1)}).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.post(f"{url}/v1/score", json={"items": items(1)}, headers=wrong).status_code == 401
        right = {"Authorization": "Bearer s3cret"}
        assert httpx.post(f"{url}/v1/score", json={"items": items(1)}, headers=right).status_code == 200
        assert httpx.get(f"{url}/healthz").status_code == 200


class _SlowScorer(Scorer):
    """Holds each request until released, to fill the concurrency limit deterministically."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def info(self):
        from proto import RewardInfo

        return RewardInfo(name="slow", version="1")

    def score(self, batch):
        self.release.wait(20)
        return [1.0 for _ in batch]


def test_concurrency_limit_answers_429_when_full() -> None:
    scorer = _SlowScorer()
    with serve(create_app(scorer, ServiceSettings(max_concurrent_requests=1)), ready_path="/readyz") as url:
        first = threading.Thread(
            target=lambda: httpx.post(f"{url}/v1/score", json={"items": items(1)}, timeout=30)
        )
        first.start()
        time.sleep(0.5)
        busy = httpx.post(f"{url}/v1/score", json={"items": items(1)})
        scorer.release.set()
        first.join()
        assert busy.status_code == 429
        assert httpx.post(f"{url}/v1/score", json={"items": items(1)}).status_code == 200


class _NaNScorer(_SlowScorer):
    def score(self, batch):
        return [float("nan"), 2.0][: len(batch)]


def test_non_finite_scores_become_item_errors() -> None:
    scorer = _NaNScorer()
    with serve(create_app(scorer), ready_path="/readyz") as url:
        results = httpx.post(f"{url}/v1/score", json={"items": items(2)}).json()["results"]
    assert (
        results[0]["status"] == "error"
        and results[0]["score"] is None
        and "non-finite" in results[0]["error"]
    )
    assert results[1] == {"id": "i1", "score": 2.0, "status": "ok", "error": None}


def test_openrlhf_route(correctness_url: str) -> None:
    prompt = "<|user|>news please"
    ok = httpx.post(
        f"{correctness_url}/v1/openrlhf",
        json={"query": [prompt + GOOD, prompt + "nothing"], "prompts": [prompt, prompt], "labels": [G1, G1]},
    )
    assert ok.status_code == 200 and ok.json() == {"rewards": [3.0, -3.0]}
    # No label: the client's mistake, so 422 naming the field (the shape has no per-item errors).
    unlabelled = httpx.post(
        f"{correctness_url}/v1/openrlhf",
        json={"query": [GOOD, GOOD], "prompts": ["", ""], "labels": [G1, None]},
    )
    assert unlabelled.status_code == 422
    assert [error["loc"] for error in unlabelled.json()["detail"]] == [["body", "labels", 1]]
    malformed = httpx.post(
        f"{correctness_url}/v1/openrlhf",
        json={
            "query": [GOOD, GOOD],
            "prompts": ["", ""],
            "labels": [G1, "<tool_call>\nnot json\n</tool_call>"],
        },
    )
    assert malformed.status_code == 422 and "malformed" in malformed.json()["detail"][0]["msg"]


def test_openrlhf_route_answers_503_when_the_scorer_fails_an_item() -> None:
    with serve(create_app(_NaNScorer()), ready_path="/readyz") as url:
        failed = httpx.post(f"{url}/v1/openrlhf", json={"query": ["a", "b"], "prompts": ["", ""]})
    assert failed.status_code == 503 and "query[0]" in failed.json()["detail"]


def test_metrics_count_requests_items_and_latency(correctness_url: str) -> None:
    httpx.post(f"{correctness_url}/v1/score", json={"items": items(3)})
    text = httpx.get(f"{correctness_url}/metrics").text
    assert metric_value(text, "gd2po_reward_items_total", reward="correctness", status="ok") >= 3
    assert metric_value(text, "gd2po_reward_request_latency_seconds_count", route="/v1/score") >= 1
    assert metric_value(text, "gd2po_reward_requests_total", route="/v1/score", code="200") >= 1
    assert metric_value(text, "gd2po_reward_batch_size_sum", reward="correctness") >= 3


def test_cli_serves_a_config_reward_and_shuts_down_gracefully(tmp_path) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text(
        "rewards:\n  - name: fmt\n    url: http://127.0.0.1:1\n    launch: {scorer: tool_call.format}\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reward_service",
            "--config",
            str(config),
            "--reward",
            "fmt",
            "--port",
            str(port),
        ]
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.2)
        assert httpx.get(f"{url}/v1/info").json()["name"] == "fmt"
        assert httpx.post(f"{url}/v1/score", json={"items": items(1)}).json()["results"][0]["score"] == 1.0
    finally:
        process.send_signal(signal.SIGTERM)
        # uvicorn drains, runs the lifespan shutdown, then re-raises the signal it caught.
        assert process.wait(timeout=20) in (0, -signal.SIGTERM)


def test_the_audit_log_holds_every_answer_before_the_client_has_it(tmp_path) -> None:
    """``audit_dir`` (run.audit under `gd2po up`): each scored item is a line keyed by the digest of its
    completion and label, on disk before the response — the witness bench.chaos checks stored scores
    against."""
    from proto.audit import read_scores, score_digest

    settings = ServiceSettings(audit_dir=tmp_path / "audit")
    app = create_app(build_scorer("tool_call.correctness"), settings, name="correctness")
    body = {"items": [*items(1), {"id": "bad", "prompt": "p", "completion": "no call", "label": G1}]}
    with serve(app, ready_path="/readyz") as url:
        assert httpx.post(f"{url}/v1/score", json=body).status_code == 200
        assert read_scores(tmp_path) == {
            ("correctness", score_digest(GOOD, G1)): {3.0},
            ("correctness", score_digest("no call", G1)): {-3.0},
        }
