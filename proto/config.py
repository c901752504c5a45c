"""Typed experiment configuration: one YAML file per experiment, environment overrides on top.

Every service reads the same file and uses its own section. Environment variables override any
key: ``GD2PO_TRAINER__LR=1e-5`` sets ``trainer.lr``; secrets (Redis password, API token) come only
from the environment. A misspelt key or a wrong type fails at start with the dotted key in the message.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "GD2PO_"
# Keys that hold secrets: read from the environment only, so they never sit in a YAML file or image.
SECRET_KEYS = ("auth.token", "redis.password")
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """The experiment configuration is invalid; the message names every offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class RunConfig(_Section):
    name: str = "gd2po-run"
    output_dir: Path = Path("runs")
    seed: int = 0
    startup_timeout: float = Field(
        default=60.0,
        ge=0,
        description="Seconds a service waits at start for Redis and the reward services (they may still "
        "be starting) before it exits with one line naming what it could not reach.",
    )


class RedisConfig(_Section):
    url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "gd2po"
    password: SecretStr | None = Field(default=None, description="Set via GD2PO_REDIS__PASSWORD only.")


class ModelConfig(_Section):
    path: Path = Field(
        default=Path(".cache/models/SmolLM2-135M-Instruct"),
        description="Local Hugging Face folder (safetensors + config + tokenizer).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["eager", "sdpa"] | None = Field(
        default=None,
        description="Attention kernel of the trainer's model (Hugging Face's attn_implementation; the "
        "rollout's vLLM picks its own). Default: the library's (sdpa). On CPU under bf16 mixed precision "
        "eager is faster: torch's CPU flash-attention backward is slow in bf16 (bench/RESULTS.md).",
    )
    max_prompt_tokens: int = Field(default=1024, gt=0)
    max_response_tokens: int = Field(default=256, gt=0)


class DataConfig(_Section):
    train_files: list[Path] = Field(
        default_factory=lambda: [Path("data/tool_calling/rlla_sft400/train.parquet")]
    )
    prompt_field: str = "prompt"
    label_field: str | None = Field(default="reward_model.ground_truth", description="Dotted path or null.")
    shuffle_seed: int | None = Field(
        default=None, description="Seed of the prompt order; default run.seed, so seeds differ in data too."
    )
    overlong_prompts: Literal["filter", "error", "truncate_left"] = Field(
        default="filter",
        description="Prompts longer than the prompt token limit (model.max_prompt_tokens, chat template "
        "applied): drop them at start (the release's filter_overlong_prompts), refuse to start, or keep "
        "their last tokens (cuts the system message). Counted in the rollout log and metrics.",
    )


class SFTConfig(_Section):
    """Cold start before RL: supervised fine-tuning of ``model.path`` on reference answers (``python -m
    trainer.sft``: the trainer's DeepSpeed engine, loss on the answer tokens only, at temperature 1). ``gd2po up`` runs it once as its own process and caches
    the result under ``output_root`` by a key of the base model, the data and these settings; the rollout
    and the trainer then start from it (and a KL reference defaults to it). Examples whose prompt and
    answer exceed ``max_tokens`` are left out, never cut."""

    train_files: list[Path] = Field(min_length=1)
    prompt_field: str = "prompt"
    completion_field: str = Field(
        default="reward_model.ground_truth", description="Dotted path of the answer to imitate."
    )
    max_examples: int | None = Field(default=None, ge=1, description="Use the first N (after shuffling).")
    epochs: float = Field(default=1.0, gt=0)
    lr: float = Field(default=5e-5, gt=0)
    batch_size: int = Field(default=4, ge=1, description="Examples per optimizer step.")
    max_tokens: int = Field(default=1024, gt=0)
    seed: int = Field(
        default=0, description="Shuffle and init seed; not run.seed, so RL seeds share one cold start."
    )
    output_root: Path = Path(".cache/models")


class RewardLaunch(_Section):
    """How ``gd2po up`` starts this reward locally (ignored when services run elsewhere)."""

    scorer: str
    replicas: int = Field(default=1, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)


class RewardEndpoint(_Section):
    """One reward dimension. Swapping a reward service is changing ``url``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    url: str | list[str] = Field(description="Base URL of the reward service, or a list of replicas.")
    weight: float = 1.0
    timeout: float = Field(default=30.0, gt=0)
    max_concurrency: int = Field(default=8, ge=1)
    batch_size: int = Field(default=64, ge=1)
    launch: RewardLaunch | None = None

    @property
    def urls(self) -> list[str]:
        return [self.url] if isinstance(self.url, str) else list(self.url)

    @field_validator("url")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if (isinstance(value, str) and not value) or (isinstance(value, list) and not value):
            raise ValueError("at least one URL is required")
        return value


class RetryConfig(_Section):
    attempts: int = Field(default=4, ge=1)
    backoff_initial: float = Field(default=0.2, gt=0)
    backoff_max: float = Field(default=5.0, gt=0)
    jitter: float = Field(default=0.2, ge=0)


class RolloutConfig(_Section):
    host: str = "127.0.0.1"
    port: int = 8200
    group_size: int = Field(default=4, ge=1)
    prompts_per_batch: int = Field(default=8, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_backlog: int = Field(
        default=64, ge=1, description="Pause generation above this many unconsumed groups."
    )
    kv_cache_gib: float = Field(default=1.0, gt=0)
    # False compiles the model (CUDA graphs on GPUs, torch.compile on CPU): faster decoding for a much
    # slower start (bench/RESULTS.md, "Figures moved out of code comments"). True keeps short runs short.
    enforce_eager: bool = True
    retry: RetryConfig = Field(default_factory=RetryConfig)
    producer_id: str | None = Field(
        default=None,
        min_length=1,
        description="Stable name of this rollout: a restart under the same name continues its prompt order "
        "(saved in Redis). Default: a new random name per process.",
    )
    max_batches: int | None = Field(default=None, ge=1, description="Stop after this many batches (tests).")
    weights_root: Path | None = Field(
        default=None,
        description="The only folder POST /v1/weights/reload may load from (default: the run's weights/, "
        "where the trainer publishes).",
    )


class TrainerConfig(_Section):
    host: str = "127.0.0.1"
    metrics_port: int = 8300
    estimator: str = "gd2po_snr"
    tau: float = 0.8
    norm_by_std: bool = True
    whiten: bool = True
    keep_rule: Literal["release", "paper"] = "release"
    reweight: bool = True
    filter: bool = True
    prompts_per_step: int = Field(default=8, ge=1)
    mini_batches: int = Field(default=1, ge=1)
    ppo_epochs: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-6, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    # Low-variance (k3) KL to a frozen reference policy, off in the paper's runs (docs/algorithm.md §8).
    kl_coef: float = Field(default=0.0, ge=0)
    reference_path: Path | None = Field(
        default=None, description="Reference policy for kl_coef > 0 (default: model.path, the start)."
    )
    entropy_coef: float = 0.0
    recompute_old_logprobs: bool = False
    # Rows whose advantage is 0 everywhere (zero-variance groups, GD²PO-dropped rollouts) add exactly
    # nothing to the PPO gradient; skipping their forward/backward gives the same update, faster.
    skip_idle_rows: bool = True
    # The G rollouts of a group share their prompt: forward it once per group with gradients and run the
    # responses on its cache (same values and gradients, much less work when prompts are longer than
    # responses; bench/RESULTS.md).
    # A micro-batch then holds whole groups (those of ⌈groups / accumulation steps⌉), so its memory is one
    # prompt + G responses per group rather than train_micro_batch_size rows: turn it off if a group's
    # responses do not fit. Off by itself under multi-rank ZeRO-3 (ranks must run equal forwards).
    share_prompt_forward: bool = True
    max_staleness: int = Field(default=2, ge=0)
    total_steps: int = Field(default=10, ge=1)
    publish_every: int = Field(
        default=1,
        ge=0,
        description="Publish the policy every N steps; 0 never publishes, so the rollout keeps sampling "
        "the starting policy (the control arm of a learning check).",
    )
    # Write + digest + announce the weights on a thread while the next step trains (the snapshot copy
    # stays on the step). For GPU trainers; on a CPU core shared with training it only moves the work.
    background_publish: bool = False
    save_every: int = Field(default=5, ge=1)
    keep_last: int = Field(default=3, ge=1)
    gradient_checkpointing: bool = False
    deepspeed: dict[str, Any] = Field(
        default_factory=lambda: {
            "zero_optimization": {"stage": 2},
            "gradient_clipping": 1.0,
            "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": 1,
        },
        description="DeepSpeed config section, passed to deepspeed.initialize.",
    )


class AuthConfig(_Section):
    token: SecretStr | None = Field(default=None, description="Bearer token; set via GD2PO_AUTH__TOKEN only.")


class ExperimentConfig(BaseSettings):
    """The whole experiment. Sections: run, redis, model, data, rewards, rollout, trainer, auth."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", allow_inf_nan=False
    )

    run: RunConfig = Field(default_factory=RunConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rewards: list[RewardEndpoint] = Field(default_factory=list)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    sft: SFTConfig | None = Field(default=None, description="Optional cold start before RL.")
    synchronous: bool = Field(default=False, description="Generate only after the trainer caught up.")

    @field_validator("rewards")
    @classmethod
    def _unique_reward_names(cls, rewards: list[RewardEndpoint]) -> list[RewardEndpoint]:
        names = [reward.name for reward in rewards]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate reward names: {duplicates}")
        return rewards

    @model_validator(mode="after")
    def _shuffle_with_the_run_seed(self) -> ExperimentConfig:
        if self.data.shuffle_seed is None:
            self.data.shuffle_seed = self.run.seed
        return self

    @model_validator(mode="after")
    def _pipeline_can_flow(self) -> ExperimentConfig:
        """Refuse settings that would deadlock rollout and trainer, naming the keys to change."""
        if self.synchronous and self.trainer.publish_every != 1:
            raise ValueError(
                "synchronous: true needs trainer.publish_every: 1 (every batch waits for new weights)"
            )
        return self

    @property
    def reward_names(self) -> list[str]:
        return [reward.name for reward in self.rewards]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the YAML file (passed as init kwargs).
        return env_settings, init_settings


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        lines.append(f"  {key}: {item['msg']}")
    return "\n".join(lines)


def _interpolate(text: str, source: Path) -> str:
    """Expand ``${VAR}`` / ``${VAR:-default}`` so a YAML file can take parameters (e.g. model paths)."""

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ConfigError(f"{source}: ${{{name}}} is not set and has no default")
        return default

    return _PLACEHOLDER.sub(replace, text)


def read_config_mapping(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML mapping of an experiment file, ``${VAR}``s expanded and ``extends:`` resolved.

    ``extends: base.yaml`` (relative to the file) starts from the base and merges this file over it:
    mappings merge key by key, anything else (lists such as ``rewards``, scalars) replaces. Variant
    experiments then state only what differs, e.g. the estimator."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _chain:
        cycle = " → ".join(str(p) for p in (*_chain, path.resolve()))
        raise ConfigError(f"{path}: extends itself ({cycle})")
    loaded = yaml.safe_load(_interpolate(path.read_text(), path)) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = loaded.pop("extends", None)
    if base is None:
        return loaded
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends must be a file name, got {base!r}")
    return _merge(read_config_mapping(path.parent / base, (*_chain, path.resolve())), loaded)


def env_var(key: str) -> str:
    """The environment variable that sets a dotted config key (``redis.url`` → ``GD2PO_REDIS__URL``)."""
    return ENV_PREFIX + key.replace(".", "__").upper()


def mask_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for files and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _refuse_secrets(mapping: dict[str, Any], source: Path) -> None:
    for key in SECRET_KEYS:
        section, _, name = key.partition(".")
        if isinstance(mapping.get(section), dict) and mapping[section].get(name) is not None:
            raise ConfigError(
                f"{source}: {key} is a secret and is read only from the environment; remove it from the "
                f"file and set {env_var(key)} instead"
            )


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, **overrides: Any) -> ExperimentConfig:
    """Load an experiment YAML (optional), apply environment overrides, validate everything."""
    data: dict[str, Any] = {}
    if path is not None:
        data.update(read_config_mapping(path))
        _refuse_secrets(data, Path(path))
    data.update(overrides)
    try:
        return ExperimentConfig(**data)
    except ValidationError as exc:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"invalid configuration{where}:\n{_describe(exc)}") from exc


def dump_config(config: ExperimentConfig) -> str:
    """YAML of the effective configuration without its secrets (for the run folder): the secret keys are
    left out (the file stays loadable; the environment supplies them) and a password written inside
    ``redis.url`` or a reward URL is masked."""
    data = config.model_dump(mode="json")
    for key in SECRET_KEYS:
        section, _, name = key.partition(".")
        data[section].pop(name)
    data["redis"]["url"] = mask_url(data["redis"]["url"])
    for reward in data["rewards"]:
        url = reward["url"]
        reward["url"] = mask_url(url) if isinstance(url, str) else [mask_url(u) for u in url]
    return yaml.safe_dump(data, sort_keys=False)
