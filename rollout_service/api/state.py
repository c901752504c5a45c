"""What the rollout's routes share, kept in ``app.state`` (set by :func:`rollout_service.api.create_api`),
and the dependencies that hand it to them."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from fastapi import HTTPException, Request, status

from rollout_service.engine import Engine
from rollout_service.weights import PolicyFollower


class Backend(Protocol):
    """The service behind the API: its engine and policy follower, None until loaded (they load in the
    background so /healthz answers at once)."""

    engine: Engine | None
    policy: PolicyFollower | None


def backend(request: Request) -> Backend:
    return request.app.state.backend


# The two below are called in the route bodies, not declared as dependencies: FastAPI solves
# dependencies before it validates the body, and a bad body must still get its 422 while loading.


def live_engine(service: Backend) -> Engine:
    """The loaded engine; 503 while it is still loading."""
    if service.engine is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail="engine still loading")
    return service.engine


def live_policy(service: Backend) -> PolicyFollower:
    """The policy follower of the loaded engine; 503 while it is still loading."""
    if service.policy is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail="engine still loading")
    return service.policy


def weights_root(request: Request) -> Path:
    """The folder manual reloads must stay inside (resolved)."""
    return request.app.state.weights_root
