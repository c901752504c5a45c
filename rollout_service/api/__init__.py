"""HTTP API of the rollout service, one router per concern: the ops routes (:mod:`proto.ops`), the
OpenAI-compatible routes (:mod:`rollout_service.api.openai`) and the control routes
(:mod:`rollout_service.api.control`). With a token configured every ``/v1`` route demands it; bodies
have the reward service's limits (:func:`proto.ops.harden`). What the routes share lives in
``app.state`` (:mod:`rollout_service.api.state`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI

from proto.ops import DEFAULT_MAX_BODY_BYTES, add_ops_routes, harden, set_auth_token
from rollout_service.api import control, openai
from rollout_service.api.state import Backend
from rollout_service.metrics import RolloutMetrics


def create_api(
    backend: Backend,
    *,
    metrics: RolloutMetrics,
    token: str | None,
    is_ready: Callable[[], bool],
    is_alive: Callable[[], bool],
    weights_root: Path,
    lifespan=None,
    max_body: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The app over ``backend`` (whose engine and policy may still be None: those routes answer 503).
    ``weights_root``: manual reloads load only folders inside it."""
    app = FastAPI(title="gd2po rollout service", lifespan=lifespan)
    app.state.backend = backend
    app.state.weights_root = Path(weights_root).resolve()
    harden(app, max_body=max_body)
    set_auth_token(app, token)
    add_ops_routes(app, is_ready=is_ready, is_alive=is_alive, registry=metrics.registry)
    app.include_router(openai.router)
    app.include_router(control.router)
    return app
