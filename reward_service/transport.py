"""HTTP plumbing of the reward service kept off the per-request hot path: a pure-ASGI gate (body limit,
request counting) instead of ``@app.middleware`` (which spawns a task group and memory streams per
request), and a route class that parses JSON bodies with pydantic-core's Rust parser (~3× the stdlib's)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pydantic_core
from fastapi import HTTPException, Request, status
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from reward_service.metrics import RewardMetrics


class _FastJSONRequest(Request):
    async def json(self):
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body)
            except ValueError as exc:  # FastAPI turns JSONDecodeError into its usual 422 json_invalid
                raise json.JSONDecodeError(str(exc), body.decode("utf-8", "replace"), 0) from exc
        return self._json


class FastJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            return await handler(_FastJSONRequest(request.scope, request.receive))

        return route


class Gate:
    """Refuses bodies over ``max_body`` bytes with 413, whether announced by Content-Length or streamed
    in chunks, and counts requests to ``counted`` paths by status code."""

    def __init__(self, app, *, max_body: int, metrics: RewardMetrics, counted: Callable[[str], bool]):
        self.app, self.max_body, self.metrics, self.counted = app, max_body, metrics, counted

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        code = 500  # if the app raises before answering, the server answers 500

        async def counting_send(message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            if self._announced_too_large(scope):
                self._reject()
                response = JSONResponse({"detail": self._detail}, status.HTTP_413_CONTENT_TOO_LARGE)
                await response(scope, receive, counting_send)
            else:
                await self.app(scope, self._limited(receive), counting_send)
        finally:
            path = scope["path"]
            if self.counted(path):
                self.metrics.requests.labels(self.metrics.reward, path, str(code)).inc()

    @property
    def _detail(self) -> str:
        return f"body larger than {self.max_body} bytes"

    def _reject(self) -> None:
        self.metrics.rejected.labels(self.metrics.reward, "body_too_large").inc()

    def _announced_too_large(self, scope) -> bool:
        for key, value in scope["headers"]:
            if key == b"content-length":
                return value.isdigit() and int(value) > self.max_body
        return False

    def _limited(self, receive):
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    self._reject()
                    # FastAPI re-raises HTTPException from body reading: this becomes the 413 answer.
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=self._detail)
            return message

        return limited_receive
