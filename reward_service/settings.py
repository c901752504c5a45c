"""Service limits and security settings, from flags or the environment (``GD2PO_REWARD_SERVICE_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from proto.ops import DEFAULT_MAX_BODY_BYTES


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GD2PO_REWARD_SERVICE_", extra="forbid")

    max_batch_items: int = Field(default=1024, ge=1, description="Larger batches get 413.")
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024, description="Larger bodies get 413.")
    max_concurrent_requests: int = Field(default=64, ge=1, description="Beyond this, 429.")
    token: SecretStr | None = Field(default=None, description="Bearer token (or GD2PO_AUTH__TOKEN).")
    audit_dir: Path | None = Field(
        default=None,
        description="Append every scored item (reward, digest of completion and label, score) to "
        "<audit_dir>/scores-<reward>-<pid>.jsonl (proto.audit); `gd2po up` sets it when run.audit is on.",
    )
