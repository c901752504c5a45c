"""Control routes of the rollout: a manual weight reload. Refused outright unless a token is configured
(:func:`proto.ops.require_token`), and only folders inside the weights root load."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from proto.messages import INT64_MAX
from proto.ops import BODY_ERRORS, ErrorBody, JSONRoute, require_token
from rollout_service.api.openai import NOT_READY
from rollout_service.api.state import Backend, backend, live_policy, weights_root
from rollout_service.weights import WeightReloadError


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

    @field_validator("path")
    @classmethod
    def _no_nul(cls, path: str) -> str:
        # The OS cannot hold such a path: resolving it raises, which would be a 500.
        if "\x00" in path:
            raise ValueError("a path cannot contain a NUL byte")
        return path


class ReloadResponse(BaseModel):
    version: int
    path: str


router = APIRouter(route_class=JSONRoute, tags=["control"], dependencies=[Depends(require_token)])


@router.post(
    "/v1/weights/reload",
    response_model=ReloadResponse,
    responses={
        **BODY_ERRORS,
        401: {"model": ErrorBody},
        403: {"model": ErrorBody},
        409: {"model": ErrorBody, "description": "folder refused; old weights kept"},
        **NOT_READY,
    },
)
async def reload(
    request: ReloadRequest, service: Backend = Depends(backend), root: Path = Depends(weights_root)
) -> ReloadResponse:
    follower = live_policy(service)
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
