"""The rollout's OpenAI-style routes declare typed responses, and what they answer is exactly that type
(in process, over the stub engine of tests/rollout_stub.py: only the HTTP layer is under test)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from rollout_stub import stub_rollout_app

from rollout_service.api.openai import ChatCompletionResponse, CompletionResponse, ModelList

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROUTES = [
    ("post", "/v1/completions", {"prompt": "hi", "n": 2, "max_tokens": 3}, CompletionResponse),
    (
        "post",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "model": "m"},
        ChatCompletionResponse,
    ),
    ("get", "/v1/models", None, ModelList),
]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    app = stub_rollout_app(token=TOKEN, weights_root=tmp_path_factory.mktemp("weights"))
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize(("method", "path", "body", "model"), ROUTES, ids=[r[1] for r in ROUTES])
def test_openapi_names_the_typed_response(client: TestClient, method, path, body, model) -> None:
    schema = client.get("/openapi.json").json()
    answer = schema["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer == {"$ref": f"#/components/schemas/{model.__name__}"}


@pytest.mark.parametrize(("method", "path", "body", "model"), ROUTES, ids=[r[1] for r in ROUTES])
def test_the_answer_is_exactly_the_declared_model(client: TestClient, method, path, body, model) -> None:
    response = client.request(method, path, json=body, headers=AUTH)
    assert response.status_code == 200
    answer = response.json()
    # Every key of the model, in its order, and nothing else (logprobs stays as null, as clients expect).
    assert model.model_validate(answer).model_dump(mode="json") == answer
    assert list(answer) == list(model.model_fields)


def test_completion_answers_what_was_generated(client: TestClient) -> None:
    completion = client.post("/v1/completions", json=ROUTES[0][2], headers=AUTH).json()
    assert completion["object"] == "text_completion" and completion["model"] == "policy"
    assert [c["index"] for c in completion["choices"]] == [0, 1]
    assert completion["choices"][0] == {
        "index": 0,
        "text": "xxx",
        "finish_reason": "length",
        "logprobs": None,
    }
    # The stub's prompt ids are the prompt's bytes: 2 prompt tokens, 3 tokens per choice.
    assert completion["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}
    chat = client.post("/v1/chat/completions", json=ROUTES[1][2], headers=AUTH).json()
    assert chat["object"] == "chat.completion" and chat["model"] == "m"
    assert chat["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "xxxx"}, "finish_reason": "length"}
    ]


def test_routes_share_one_bearer_dependency(client: TestClient, tmp_path: Path) -> None:
    for method, path, body, _ in ROUTES:
        refused = client.request(method, path, json=body, headers={"Authorization": "Bearer wrong"})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    # The control route demands the same token (and is refused outright without one: 403).
    assert client.post("/v1/weights/reload", json={"path": str(tmp_path)}).status_code == 401
    open_app = stub_rollout_app(token=None, weights_root=tmp_path)
    with TestClient(open_app) as open_client:
        assert open_client.get("/v1/models").status_code == 200
        assert open_client.post("/v1/weights/reload", json={"path": str(tmp_path)}).status_code == 403
