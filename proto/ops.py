"""The operational HTTP contract every gd2po service honours: ``/healthz``, ``/readyz``,
``/metrics`` (Prometheus text) and optional bearer-token auth.

Kept here, beside the wire contracts, so the three services expose these routes identically.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from fastapi import Depends, FastAPI, HTTPException, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from pydantic import BaseModel

_bearer = HTTPBearer(auto_error=False)


class Health(BaseModel):
    status: str


class ErrorBody(BaseModel):
    """Shape of every error response body."""

    detail: str


def bearer_auth(token: str | None) -> Callable[..., None]:
    """A FastAPI dependency that demands ``Authorization: Bearer <token>`` when a token is set."""

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        if token is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials, token):
            raise HTTPException(
                status_code=status.HTTP_401_UNAUTHORIZED,
                detail="missing or invalid bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


def require_token(token: str | None) -> Callable[..., None]:
    """Like :func:`bearer_auth` but for control routes: refuse outright when no token is configured."""
    inner = bearer_auth(token)

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        if token is None:
            raise HTTPException(
                status_code=status.HTTP_403_FORBIDDEN,
                detail="control routes are disabled: set GD2PO_AUTH__TOKEN to enable them",
            )
        inner(credentials)

    return check


def add_ops_routes(
    app: FastAPI,
    *,
    is_ready: Callable[[], bool],
    is_alive: Callable[[], bool] = lambda: True,
    registry: CollectorRegistry = REGISTRY,
) -> None:
    """Register /healthz (process alive and not failed), /readyz (can do its job) and /metrics."""

    @app.get(
        "/healthz",
        response_model=Health,
        responses={503: {"model": ErrorBody, "description": "a fatal error occurred"}},
        tags=["ops"],
    )
    def healthz() -> Health:
        if not is_alive():
            raise HTTPException(status_code=status.HTTP_503_SERVICE_UNAVAILABLE, detail="failed")
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Health,
        responses={503: {"model": ErrorBody, "description": "not ready yet"}},
        tags=["ops"],
    )
    def readyz() -> Health:
        if not is_ready():
            raise HTTPException(status_code=status.HTTP_503_SERVICE_UNAVAILABLE, detail="not ready")
        return Health(status="ready")

    @app.get("/metrics", tags=["ops"], response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
