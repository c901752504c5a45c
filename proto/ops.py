"""The operational HTTP contract every gd2po service honours: ``/healthz``, ``/readyz``,
``/metrics`` (Prometheus text), optional bearer-token auth, and the same answers to hostile input
(:func:`harden`): JSON bodies only (415), UTF-8 only (400), no non-finite number anywhere (422), a body
size limit (413), and a 422 answer that cannot itself fail.

Kept here, beside the wire contracts, so the three services expose these routes identically. The
FastAPI pieces a service assembles: :data:`ops_router` (the three routes, reading :class:`OpsProbes`
from ``app.state.ops``; :func:`add_ops_routes` sets both), the async dependencies :func:`bearer_auth`
and :func:`require_token` (the token is ``app.state.auth_token``, :func:`set_auth_token`), and
:class:`JSONRoute` for routers whose routes take JSON bodies.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydantic_core
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from pydantic import BaseModel

_bearer = HTTPBearer(auto_error=False)

#: Request bodies above this many bytes get 413 (the default of every service).
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024

#: Documented answers of :func:`harden`, for the ``responses`` of routes that take a JSON body.
BODY_ERRORS: dict[int | str, dict[str, Any]] = {}  # filled below, once ErrorBody exists


class Health(BaseModel):
    status: str


class ErrorBody(BaseModel):
    """Shape of every error response body."""

    detail: str


BODY_ERRORS.update(
    {
        400: {"model": ErrorBody, "description": "body is not UTF-8"},
        413: {"model": ErrorBody, "description": "body too large"},
        415: {"model": ErrorBody, "description": "body is not application/json"},
    }
)


def set_auth_token(app: FastAPI, token: str | None) -> None:
    """Give ``app`` the bearer token that :func:`bearer_auth` and :func:`require_token` check (None: no
    auth). Every app that uses them must call this: a route reached without it answers 500 rather than
    being silently open."""
    app.state.auth_token = token


def _check_token(token: str, credentials: HTTPAuthorizationCredentials | None) -> None:
    # Bytes, not str: compare_digest raises on non-ASCII str. Starlette decodes headers as latin-1, so
    # encoding back gives the bytes sent; the token is compared as UTF-8.
    if credentials is None or not secrets.compare_digest(
        credentials.credentials.encode("latin-1"), token.encode()
    ):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def bearer_auth(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> None:
    """Dependency: demand ``Authorization: Bearer <token>`` when the app has a token
    (:func:`set_auth_token`); 401 otherwise. Async, so FastAPI runs it on the event loop instead of
    hopping to a worker thread per request."""
    token = request.app.state.auth_token
    if token is not None:
        _check_token(token, credentials)


async def require_token(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> None:
    """Dependency for control routes: like :func:`bearer_auth`, but 403 when the app has no token (a
    control route is never open)."""
    token = request.app.state.auth_token
    if token is None:
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN,
            detail="control routes are disabled: set GD2PO_AUTH__TOKEN to enable them",
        )
    _check_token(token, credentials)


@dataclass(frozen=True)
class OpsProbes:
    """What the ops routes ask the service: alive and not failed, ready to do its job, and the metric
    registry to expose. Kept in ``app.state.ops`` (:func:`add_ops_routes`)."""

    is_ready: Callable[[], bool]
    is_alive: Callable[[], bool] = lambda: True
    registry: CollectorRegistry = REGISTRY


def _probes(request: Request) -> OpsProbes:
    return request.app.state.ops


def add_ops_routes(
    app: FastAPI,
    *,
    is_ready: Callable[[], bool],
    is_alive: Callable[[], bool] = lambda: True,
    registry: CollectorRegistry = REGISTRY,
) -> None:
    """Register /healthz (process alive and not failed), /readyz (can do its job) and /metrics."""
    app.state.ops = OpsProbes(is_ready=is_ready, is_alive=is_alive, registry=registry)
    app.include_router(ops_router)


# A JSON number can only overflow a float to ±inf with a 3-digit exponent or 309+ digits; only then is
# the parsed body searched for one (the parser already refuses NaN/Infinity literals).
_MAYBE_OVERFLOW = re.compile(rb"[0-9][eE]\+?[0-9]{3}|[0-9]{309}")


def _non_finite(value: Any, path: tuple[str | int, ...] = ()) -> tuple[str | int, ...] | None:
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        if (found := _non_finite(child, (*path, key))) is not None:
            return found
    return None


class _JSONRequest(Request):
    """Parses with pydantic-core's Rust parser (faster than the stdlib's), refusing non-finite numbers."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                value = pydantic_core.from_json(body, allow_inf_nan=False)
            except ValueError as exc:
                try:
                    text = body.decode()
                except UnicodeDecodeError:
                    # HTTPException passes through FastAPI's body parsing unchanged.
                    raise HTTPException(
                        status.HTTP_400_BAD_REQUEST, detail="body is not UTF-8 (JSON must be UTF-8)"
                    ) from None
                # FastAPI turns JSONDecodeError into its usual 422 json_invalid.
                raise json.JSONDecodeError(str(exc), text, 0) from exc
            if _MAYBE_OVERFLOW.search(body) and (where := _non_finite(value)) is not None:
                field = ".".join(map(str, where)) or "<body>"
                raise json.JSONDecodeError(f"{field}: number overflows to a non-finite float", "", 0)
            self._json = value
        return self._json


def _is_json(content_type: str | None) -> bool:
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class JSONRoute(APIRoute):
    """A route whose body must be JSON: any other content type (or none) with a body gets 415."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None

        async def route(request: Request) -> Response:
            request = _JSONRequest(request.scope, request.receive)
            if takes_body and not _is_json(request.headers.get("content-type")) and await request.body():
                raise HTTPException(
                    status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                    detail="body must be JSON: send Content-Type: application/json",
                )
            return await handler(request)

        return route


ops_router = APIRouter(route_class=JSONRoute, tags=["ops"])
"""/healthz, /readyz and /metrics of every service; they read :class:`OpsProbes` from ``app.state.ops``."""


@ops_router.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": ErrorBody, "description": "a fatal error occurred"}},
)
async def healthz(probes: OpsProbes = Depends(_probes)) -> Health:
    return _health(probes.is_alive(), "ok", "failed")


@ops_router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": ErrorBody, "description": "not ready yet"}},
)
async def readyz(probes: OpsProbes = Depends(_probes)) -> Health:
    return _health(probes.is_ready(), "ready", "not ready")


def _health(good: bool, status_text: str, failure: str) -> Health:
    """``status_text`` when ``good``, else 503 with ``failure``."""
    if not good:
        raise HTTPException(status_code=status.HTTP_503_SERVICE_UNAVAILABLE, detail=failure)
    return Health(status=status_text)


@ops_router.get("/metrics", response_class=Response)
def metrics(probes: OpsProbes = Depends(_probes)) -> Response:
    # Sync, so a large exposition is rendered in a worker thread, not on the event loop.
    return Response(generate_latest(probes.registry), media_type=CONTENT_TYPE_LATEST)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {key: _json_safe(child) for key, child in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(child) for child in value]
    return value


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 answer, except that the offending inputs are made JSON-safe first: its own handler
    fails (and the client gets 500) on a non-finite float or non-UTF-8 bytes among them."""
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={"detail": jsonable_encoder(_json_safe(exc.errors()))},
    )


class BodyLimit:
    """Pure-ASGI (no task group per request, unlike ``@app.middleware``): refuses bodies over
    ``max_body`` bytes with 413, whether announced by Content-Length or streamed in chunks.
    ``on_reject()`` is called per refusal, ``on_answer(path, status)`` per answered request."""

    def __init__(
        self,
        app,
        *,
        max_body: int,
        on_reject: Callable[[], None] | None = None,
        on_answer: Callable[[str, int], None] | None = None,
    ):
        self.app, self.max_body, self.on_reject, self.on_answer = app, max_body, on_reject, on_answer

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        code = 500  # if the app raises before answering, the server answers 500

        async def watching_send(message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            if self._announced_too_large(scope):
                self._rejected()
                response = JSONResponse({"detail": self._detail}, status.HTTP_413_CONTENT_TOO_LARGE)
                await response(scope, receive, watching_send)
            else:
                await self.app(scope, self._limited(receive), watching_send)
        finally:
            if self.on_answer is not None:
                self.on_answer(scope["path"], code)

    @property
    def _detail(self) -> str:
        return f"body larger than {self.max_body} bytes"

    def _rejected(self) -> None:
        if self.on_reject is not None:
            self.on_reject()

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
                    self._rejected()
                    # FastAPI re-raises HTTPException from body reading: this becomes the 413 answer.
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=self._detail)
            return message

        return limited_receive


def harden(
    app: FastAPI,
    *,
    max_body: int = DEFAULT_MAX_BODY_BYTES,
    on_reject: Callable[[], None] | None = None,
    on_answer: Callable[[str, int], None] | None = None,
) -> None:
    """Give ``app`` the shared answers to hostile input. Call before adding routes (the route class
    applies to routes added afterwards)."""
    app.router.route_class = JSONRoute
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(BodyLimit, max_body=max_body, on_reject=on_reject, on_answer=on_answer)
