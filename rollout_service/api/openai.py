"""OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``, served by the
training engine (for evaluation and standard clients). Requests and responses are typed models, so the
OpenAPI schema states what a client gets."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from proto import ChatMessage, Completion
from proto.messages import FinishReason
from proto.ops import BODY_ERRORS, ErrorBody, JSONRoute, bearer_auth
from rollout_service.api.state import Backend, backend, live_engine
from rollout_service.engine import Sampling

MODEL_NAME = "policy"
NOT_READY = {503: {"model": ErrorBody, "description": "engine still loading"}}


class _Request(BaseModel):
    # Unknown OpenAI fields (user, logit_bias…) are ignored so standard clients work unchanged.
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


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: None = None  # not served; present (null) as OpenAI clients expect the key


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "gd2po"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


router = APIRouter(route_class=JSONRoute, tags=["openai"], dependencies=[Depends(bearer_auth)])
ERRORS = {**BODY_ERRORS, 401: {"model": ErrorBody}, **NOT_READY}


async def _generate(
    service: Backend, prompt: str | list[dict], request: _Request
) -> tuple[int, list[Completion]]:
    """Sample ``request.n`` completions of ``prompt``: the prompt's token count and the completions.
    503 while the engine loads."""
    engine = live_engine(service)
    # Tokenising a body of up to max_body bytes takes a while: not on the loop that answers /healthz.
    prompt_ids = await asyncio.to_thread(engine.prompt_ids, prompt)
    (group,) = await asyncio.to_thread(engine.generate, [prompt_ids], request.sampling())
    return len(prompt_ids), group


def _usage(prompt_tokens: int, group: list[Completion]) -> Usage:
    completion_tokens = sum(len(c.token_ids) for c in group)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
async def completions(request: CompletionRequest, service: Backend = Depends(backend)) -> CompletionResponse:
    prompt_tokens, group = await _generate(service, request.prompt, request)
    return CompletionResponse(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=request.model,
        choices=[
            CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason) for i, c in enumerate(group)
        ],
        usage=_usage(prompt_tokens, group),
    )


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
async def chat_completions(
    request: ChatRequest, service: Backend = Depends(backend)
) -> ChatCompletionResponse:
    prompt_tokens, group = await _generate(service, [m.model_dump() for m in request.messages], request)
    return ChatCompletionResponse(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=request.model,
        choices=[
            ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
            for i, c in enumerate(group)
        ],
        usage=_usage(prompt_tokens, group),
    )


@router.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorBody}})
async def models() -> ModelList:
    return ModelList(data=[ModelCard(id=MODEL_NAME)])
