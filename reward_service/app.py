"""The reward service's FastAPI app: one scorer behind ``/v1/score``, ``/v1/info`` and the OpenRLHF route
(:data:`router`), with the ops routes, bearer auth and hostile-input answers of :mod:`proto.ops`. What
the routes share (scorer, limits, readiness) is a :class:`RewardState` in ``app.state.reward``.
Failures stay per item (``status=error``, ``score=null``); oversize → 413, busy → 429."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError

from proto import (
    OpenRLHFRequest,
    OpenRLHFResponse,
    RewardInfo,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
)
from proto.audit import AuditedScore, AuditLog, score_digest, score_log_path
from proto.ops import BODY_ERRORS, ErrorBody, JSONRoute, add_ops_routes, bearer_auth, harden, set_auth_token
from reward_service.chat_text import openrlhf_items
from reward_service.metrics import RewardMetrics
from reward_service.scorers import Scorer
from reward_service.scorers.base import InvalidLabel
from reward_service.settings import ServiceSettings

log = logging.getLogger("reward_service")

ERRORS = {
    **BODY_ERRORS,
    401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
    413: {"model": ErrorBody, "description": "body or batch too large"},
    429: {"model": ErrorBody, "description": "too many concurrent requests"},
    503: {"model": ErrorBody, "description": "scorer not loaded yet"},
}


class _Busy:
    """Admission control: at most ``limit`` scoring requests at once; the rest get 429 immediately."""

    def __init__(self, limit: int):
        self.limit, self.active = limit, 0

    def __enter__(self) -> None:
        if self.active >= self.limit:
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS, detail=f"more than {self.limit} requests in flight"
            )
        self.active += 1

    def __exit__(self, *exc: object) -> None:
        self.active -= 1


def _result(item_id: str, value: float | Exception) -> ScoreResult:
    if isinstance(value, Exception):
        return ScoreResult(
            id=item_id, status="error", error=f"{type(value).__name__}: {value}"[:500] or "error"
        )
    if not math.isfinite(value):
        return ScoreResult(id=item_id, status="error", error=f"scorer returned a non-finite score ({value})")
    return ScoreResult(id=item_id, score=float(value), status="ok")


@dataclass
class RewardState:
    """What the routes of one reward app share, kept in ``app.state.reward``."""

    scorer: Scorer
    info: RewardInfo
    settings: ServiceSettings
    metrics: RewardMetrics
    busy: _Busy
    on_fatal: Callable[[], None] | None = None
    audit: AuditLog | None = None
    ready: bool = False
    failed: bool = False


def reward_state(request: Request) -> RewardState:
    return request.app.state.reward


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """Load the scorer off the event loop; ``/readyz`` turns 200 once it is loaded."""
    state: RewardState = app.state.reward
    try:
        await run_in_threadpool(state.scorer.load)
    except (OSError, ValueError) as exc:  # a missing or unusable dependency, not a bug
        log.error("reward %r cannot start: %s", state.info.name, exc)
        state.failed = True
        if state.on_fatal is not None:
            state.on_fatal()
    else:
        state.ready = True
    yield
    state.ready = False


async def _score(state: RewardState, items: list[ScoreItem], route: str) -> tuple[list[ScoreResult], list]:
    """Score ``items`` with the admission limits; returns the results and the scorer's raw values
    (a float or an exception per item). Raises 503 while loading, 413 over ``max_batch_items``, 429
    when busy."""
    info, metrics, settings = state.info, state.metrics, state.settings
    if not state.ready:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail="scorer is still loading")
    if len(items) > settings.max_batch_items:
        metrics.rejected.labels(info.name, "batch_too_large").inc()
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            detail=f"items: {len(items)} items exceed the limit of {settings.max_batch_items}",
        )
    with state.busy:
        metrics.inflight.labels(info.name).inc()
        started = time.perf_counter()
        try:
            # Always off the event loop, so /healthz and /readyz answer while a batch is scored: even a
            # pure-Python scorer can spend seconds on one hostile batch (the GIL is released to the loop
            # every switch interval).
            values = await run_in_threadpool(state.scorer.score, items)
        finally:
            metrics.inflight.labels(info.name).dec()
        metrics.latency.labels(info.name, route).observe(time.perf_counter() - started)
    metrics.batch_size.labels(info.name).observe(len(items))
    results = [_result(item.id, value) for item, value in zip(items, values, strict=True)]
    errors = Counter(
        type(value).__name__ if isinstance(value, Exception) else "NonFiniteScore"
        for result, value in zip(results, values, strict=True)
        if result.status == "error"
    )
    # One update per label set and request, not per item: label lookups cost more than scoring.
    metrics.items.labels(info.name, "ok").inc(len(results) - errors.total())
    if errors:
        metrics.items.labels(info.name, "error").inc(errors.total())
    for kind, count in errors.items():
        metrics.errors.labels(info.name, kind).inc(count)
    if state.audit is not None:
        now = time.time()
        audited = [
            AuditedScore(info.name, score_digest(item.completion, item.label), result.score, now)
            for item, result in zip(items, results, strict=True)
        ]
        await run_in_threadpool(state.audit.append, audited)  # fsync'd: off the event loop
    return results, values


router = APIRouter(route_class=JSONRoute, tags=["reward"])
"""The reward API: /v1/info, /v1/score and the OpenRLHF route."""


@router.get("/v1/info", response_model=RewardInfo)
async def get_info(state: RewardState = Depends(reward_state)) -> RewardInfo:
    return state.info


@router.post(
    "/v1/score",
    response_model=ScoreResponse,
    responses=ERRORS,
    dependencies=[Depends(bearer_auth)],
)
async def score(request: ScoreRequest, state: RewardState = Depends(reward_state)) -> ScoreResponse:
    """Score a batch; each item gets a finite score (status ok) or an error (score null)."""
    results, _ = await _score(state, request.items, "/v1/score")
    return ScoreResponse(reward=state.info.name, version=state.info.version, results=results)


@router.post(
    "/v1/openrlhf",
    response_model=OpenRLHFResponse,
    responses={**ERRORS, 503: {"model": ErrorBody, "description": "scorer not loaded, or some items failed"}},
    dependencies=[Depends(bearer_auth)],
)
async def openrlhf(request: OpenRLHFRequest, state: RewardState = Depends(reward_state)) -> OpenRLHFResponse:
    """OpenRLHF remote-RM shape. ``query`` is prompt+response; only the response is scored (padding,
    prompt and chat markers removed, :func:`reward_service.chat_text.openrlhf_response`), so it scores
    as ``/v1/score`` scores the bare response. A failed item fails the call (no fake 0): 422 naming the
    field if the item was unscorable as sent (prompt not found, bad label), else 503."""
    items = openrlhf_items(request)
    results, values = await _score(state, items, "/v1/openrlhf")
    invalid = [
        {"type": "value_error", "loc": ["body", "labels", index], "msg": str(value), "input": None}
        for index, value in enumerate(values)
        if isinstance(value, InvalidLabel)
    ]
    if invalid:
        raise RequestValidationError(invalid)
    failed = [r for r in results if r.status == "error"]
    if failed:
        summary = "; ".join(f"query[{r.id}]: {r.error}" for r in failed[:5])
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail=f"{len(failed)} item(s) failed: {summary}"
        )
    return OpenRLHFResponse(rewards=[r.score for r in results])


def create_app(
    scorer: Scorer,
    settings: ServiceSettings | None = None,
    *,
    token: str | None = None,
    name: str | None = None,
    on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    """Build the app; the scorer is loaded at startup and ``/readyz`` turns 200 once it is.

    ``name`` is the reward's name in the experiment (defaults to the scorer's own), used in
    responses and metric labels so swapping a scorer keeps the reward's identity. A scorer that cannot
    load (e.g. no checkpoint at its path) is logged in one line, ``/healthz`` answers 503 and
    ``on_fatal`` is called (the CLI then exits non-zero).
    """
    settings = settings or ServiceSettings()
    token = token or (settings.token.get_secret_value() if settings.token else None)
    info: RewardInfo = scorer.info()
    if name:
        info = info.model_copy(update={"name": name})
    metrics = RewardMetrics(info.name)
    state = RewardState(
        scorer=scorer,
        info=info,
        settings=settings,
        metrics=metrics,
        busy=_Busy(settings.max_concurrent_requests),
        on_fatal=on_fatal,
        audit=AuditLog(score_log_path(settings.audit_dir, info.name)) if settings.audit_dir else None,
    )
    app = FastAPI(title=f"gd2po reward service: {info.name}", version=info.version, lifespan=_lifespan)
    app.state.reward = state
    counted = {"/v1/score", "/v1/openrlhf", "/v1/info"}
    harden(
        app,
        max_body=settings.max_body_bytes,
        on_reject=metrics.rejected.labels(info.name, "body_too_large").inc,
        on_answer=lambda path, code: (
            metrics.requests.labels(info.name, path, str(code)).inc() if path in counted else None
        ),
    )
    set_auth_token(app, token)
    add_ops_routes(
        app, is_ready=lambda: state.ready, is_alive=lambda: not state.failed, registry=metrics.registry
    )
    app.include_router(router)
    return app
