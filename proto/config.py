"""Typed experiment configuration: one YAML file per experiment, environment overrides on top.

Every service reads the same file and uses its own section. Environment variables override any
key: ``GD2PO_TRAINER__LR=1e-5`` sets ``trainer.lr``, ``GD2PO_TRAINER__ADVANTAGE__TAU=0.9`` sets
``trainer.advantage.tau``; secrets (Redis password, API token) come only
from the environment. A misspelt key or a wrong type fails at start with the dotted key in the message.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "GD2PO_"
# Keys that hold secrets: read from the environment only, so they never sit in a YAML file or image.
SECRET_KEYS = ("auth.token", "redis.password")
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """The experiment configuration is invalid; the message names every offending key."""


class _Section(BaseModel):
    # Attribute docstrings are the one place a key is documented: they become the fields' descriptions
    # (JSON schema, errors) and docs/config.md (``python -m gd2po.config_reference``).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)


TrackerName = Literal["tensorboard", "wandb", "mlflow"]
TRACKERS: tuple[str, ...] = get_args(TrackerName)
"""The experiment trackers ``run.report_to`` can name (``trainer.trackers`` opens each one)."""


class TrackingConfig(_Section):
    """Options of the experiment trackers named in ``run.report_to``."""

    project: str = "gd2po"
    """W&B project and MLflow experiment the run is logged to; the tracker's run is named ``run.name``."""
    completions_every: int = Field(default=10, ge=0)
    """Log a table of sample completions with their per-reward scores and advantage every this many
    steps (0: never)."""
    completions_per_table: int = Field(default=8, ge=1)
    """Rows of that table at most: the step's first completions, group by group."""
    wandb_mode: Literal["online", "offline"] | None = None
    """W&B mode; unset, W&B decides (``WANDB_MODE``, else online, which needs ``WANDB_API_KEY``).
    Offline runs are written under the run folder's ``wandb/``; ``wandb sync`` uploads them later."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking server or store; unset, a local file store in the run folder's ``mlruns/``
    (MLflow 3 opens file stores only with ``MLFLOW_ALLOW_FILE_STORE=true``, which the trainer sets for
    itself: ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri RUN_DIR/mlruns`` browses it)."""


class RunConfig(_Section):
    """The run: its name, folder, seed and experiment trackers."""

    name: str = "gd2po-run"
    """Run name (``gd2po up`` names the run folder after it)."""
    output_dir: Path = Path("runs")
    """Run folder: the trainer writes ``metrics.jsonl``, ``weights/`` and ``checkpoints/`` here."""
    seed: int = 0
    """Seeds sampling, training and (unless ``data.shuffle_seed`` is set) the prompt order."""
    startup_timeout: float = Field(default=60.0, ge=0)
    """Seconds a service waits at start for Redis and the reward services (they may still be starting)
    before it exits with one line naming what it could not reach."""
    report_to: list[TrackerName] = Field(default_factory=list)
    """Experiment trackers the trainer logs every step to, beside ``metrics.jsonl`` and Prometheus: the
    same record under the names TRL and verl use where they have one (``rewards/<name>/mean``), the
    config, and sample completions every ``run.tracking.completions_every`` steps. TensorBoard writes to
    the run folder's ``tensorboard/``. A tracker that cannot start stops the trainer at start."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    audit: bool = False
    """Keep audit logs outside Redis in the run folder's ``audit/`` (:mod:`proto.audit`): each rollout
    appends every group Redis acknowledged, each reward service ``gd2po up`` launches every score it
    answered. What ``python -m bench.chaos`` reconciles against the Redis ledger; one fsync'd line per
    group and per scored item."""

    @field_validator("report_to")
    @classmethod
    def _each_tracker_once(cls, report_to: list[str]) -> list[str]:
        if len(set(report_to)) != len(report_to):
            raise ValueError(f"names a tracker twice: {report_to}")
        return report_to


class RedisConfig(_Section):
    """The Redis every service shares."""

    url: str = "redis://127.0.0.1:6379/0"
    """Redis URL (a password written here is masked in logs and the run's config.yaml)."""
    namespace: str = "gd2po"
    """Prefix of every Redis name, so several experiments can share one Redis."""
    password: SecretStr | None = None
    """Set via GD2PO_REDIS__PASSWORD only."""


class ModelConfig(_Section):
    """The policy model."""

    path: Path = Path(".cache/models/SmolLM2-135M-Instruct")
    """Local Hugging Face folder (safetensors + config + tokenizer)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights and compute dtype of the rollout and the trainer."""
    attn_implementation: Literal["eager", "sdpa"] | None = None
    """Attention kernel of the trainer's model (Hugging Face's attn_implementation; the rollout's vLLM
    picks its own). Default: the library's (sdpa). On CPU under bf16 mixed precision eager is faster:
    torch's CPU flash-attention backward is slow in bf16 (bench/RESULTS.md)."""
    max_prompt_tokens: int = Field(default=1024, gt=0)
    """Longest prompt, chat template applied (see ``data.overlong_prompts``)."""
    max_response_tokens: int = Field(default=256, gt=0)
    """Longest sampled response."""


class DataConfig(_Section):
    """The RL prompts."""

    train_files: list[Path] = Field(
        default_factory=lambda: [Path("data/tool_calling/rlla_sft400/train.parquet")]
    )
    """Prompt files (parquet or jsonl)."""
    prompt_field: str = "prompt"
    """Field holding the prompt (a string or a list of chat messages)."""
    label_field: str | None = "reward_model.ground_truth"
    """Dotted path of the label passed to the rewards, or null."""
    shuffle_seed: int | None = None
    """Seed of the prompt order; default run.seed, so seeds differ in data too."""
    overlong_prompts: Literal["filter", "error", "truncate_left"] = "filter"
    """Prompts longer than the prompt token limit (model.max_prompt_tokens, chat template applied): drop
    them at start (the release's filter_overlong_prompts), refuse to start, or keep their last tokens
    (cuts the system message). Counted in the rollout log and metrics."""


class SFTConfig(_Section):
    """Cold start before RL: supervised fine-tuning of ``model.path`` on reference answers (``python -m
    trainer.sft``: the trainer's DeepSpeed engine, loss on the answer tokens only, at temperature 1).
    ``gd2po up`` runs it once as its own process and caches the result under ``output_root`` by a key of
    the base model, the data and these settings; the rollout and the trainer then start from it (and a
    KL reference defaults to it). Examples whose prompt and answer exceed ``max_tokens`` are left out,
    never cut."""

    train_files: list[Path] = Field(min_length=1)
    """Files of prompts with reference answers."""
    prompt_field: str = "prompt"
    """Field holding the prompt."""
    completion_field: str = "reward_model.ground_truth"
    """Dotted path of the answer to imitate."""
    max_examples: int | None = Field(default=None, ge=1)
    """Use the first N (after shuffling)."""
    epochs: float = Field(default=1.0, gt=0)
    """Passes over the examples (a fraction takes part of one)."""
    lr: float = Field(default=5e-5, gt=0)
    """AdamW learning rate."""
    batch_size: int = Field(default=4, ge=1)
    """Examples per optimizer step."""
    max_tokens: int = Field(default=1024, gt=0)
    """Longest prompt + answer; longer examples are left out."""
    seed: int = 0
    """Shuffle and init seed; not run.seed, so RL seeds share one cold start."""
    output_root: Path = Path(".cache/models")
    """Folder of the cached cold-start models."""


class RewardLaunch(_Section):
    """How ``gd2po up`` starts this reward locally (ignored when services run elsewhere)."""

    scorer: str
    """Registered scorer name (``reward_service.scorers``), e.g. ``tool_call.correctness``."""
    replicas: int = Field(default=1, ge=1)
    """Processes to start; the rollout spreads requests over them."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Scorer options."""


class RewardEndpoint(_Section):
    """One reward dimension. Swapping a reward service is changing ``url``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Reward name (metrics label, key of the group's scores)."""
    url: str | list[str]
    """Base URL of the reward service, or a list of replicas."""
    weight: float = 1.0
    """Weight w of this reward in the combined advantage (GRPO: in the summed reward)."""
    timeout: float = Field(default=30.0, gt=0)
    """Seconds per scoring request."""
    max_concurrency: int = Field(default=8, ge=1)
    """Scoring requests in flight to this reward."""
    batch_size: int = Field(default=64, ge=1)
    """Responses per scoring request."""
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
    """Retries of a failed scoring request (exponential backoff with jitter)."""

    attempts: int = Field(default=4, ge=1)
    """Tries per request, the first included."""
    backoff_initial: float = Field(default=0.2, gt=0)
    """Seconds before the first retry."""
    backoff_max: float = Field(default=5.0, gt=0)
    """Longest wait between tries."""
    jitter: float = Field(default=0.2, ge=0)
    """Random fraction added to each wait."""


class RolloutConfig(_Section):
    """The rollout service: sampling, backlog and weight reloads."""

    host: str = "127.0.0.1"
    """Address of the rollout's HTTP server."""
    port: int = 8200
    """Port of the rollout's HTTP server."""
    group_size: int = Field(default=4, ge=1)
    """Rollouts (G) sampled per prompt."""
    prompts_per_batch: int = Field(default=8, ge=1)
    """Prompts generated together."""
    temperature: float = Field(default=1.0, ge=0)
    """Sampling temperature; every log-prob is of softmax(logits / T)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling; training rollouts need 1 (nucleus log-probs are renormalised)."""
    max_backlog: int = Field(default=64, ge=1)
    """Pause generation above this many unconsumed groups. With ``trainer.dynamic_sampling`` clamped into
    [ceil(oversample · prompts_per_step), max_staleness · prompts_per_step] (docs/architecture.md §2.2)."""
    kv_cache_gib: float = Field(default=1.0, gt=0)
    """vLLM KV-cache size in GiB."""
    enforce_eager: bool = True
    """True skips compiling the model; false compiles it (CUDA graphs on GPUs, torch.compile on CPU):
    faster decoding for a much slower start (bench/RESULTS.md). True keeps short runs short."""
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    """vLLM workers the model is sharded over in each rollout engine (one GPU each; on CPU each worker gets
    its share of the service's cores unless VLLM_CPU_OMP_THREADS_BIND says otherwise). Folder reloads and
    broadcast transfers reach every worker (docs/architecture.md §4.3.1)."""
    retry: RetryConfig = Field(default_factory=RetryConfig)
    replicas: int = Field(default=1, ge=1)
    """Rollout services ``gd2po up`` starts (compose: ``--scale rollout-cpu=N``; Helm: ``rollout.replicas``).
    Replicas share one prompt order through Redis, each prompt once per epoch across them; each follows
    the policy on its own. The backlog bound then loosens to max_backlog − 1 + (2·replicas − 1) ·
    prompts_per_batch unconsumed groups (docs/architecture.md; under ``trainer.dynamic_sampling`` its
    clamped bound in place of max_backlog)."""
    producer_id: str | None = Field(default=None, min_length=1, max_length=200)
    """Name of this rollout in group ids, the trainer's per-producer staleness metrics and its audit log
    (``gd2po up`` names replicas rollout-0, rollout-1, …). Default: a new random name per process."""
    max_batches: int | None = Field(default=None, ge=1)
    """Stop after this many batches (tests); a synchronous dynamic-sampling trainer's requests for more
    groups are batches too."""
    weights_root: Path | None = None
    """The only folder POST /v1/weights/reload may load from (default: the run's weights/, where the
    trainer publishes)."""


# -- trainer: advantage estimators -------------------------------------------------------------------
# One variant per estimator registered in trainer.algorithms (a test keeps the two in step): each holds
# exactly the options that estimator reads, so an option that does not apply fails at load instead of
# being silently ignored. The option names are compute_advantages' keyword arguments.

DEFAULT_ESTIMATOR = "gd2po_snr"


class _AdvantageBase(_Section):
    estimator: str  # first in every variant; each narrows it to its own name
    norm_by_std: bool = True
    """Divide each reward's group advantage by the group's standard deviation; false gives A = r − mean,
    so rewards with a large range dominate (docs/algorithm.md §2)."""


class GRPOAdvantage(_AdvantageBase):
    """GRPO: group-normalise the weighted reward sum; never batch-whitened."""

    estimator: Literal["grpo"] = "grpo"


class GDPOAdvantage(_AdvantageBase):
    """GDPO: normalise each reward within its group, sum with the weights, whiten over the batch."""

    estimator: Literal["gdpo"] = "gdpo"
    whiten: bool = True
    """Whiten the advantages over the batch's (kept) response tokens (docs/algorithm.md §5)."""


class GD2POHardAdvantage(GDPOAdvantage):
    """GD²PO-Hard: GDPO's advantages, every rollout whose rewards pull in opposite directions dropped."""

    estimator: Literal["gd2po_hard"] = "gd2po_hard"  # type: ignore[assignment]
    reweight: bool = True
    """Scale each prompt's advantages by κ, the fraction of its rollouts passing the keep rule."""
    filter: bool = True
    """Zero the rollouts failing the keep rule; false keeps them (κ still counts them: the "κ without
    filter" ablation; with ``reweight: false`` too it is GDPO)."""


class AdaptiveTauConfig(_Section):
    """Move τ after every step toward a target drop ratio (trainer/algorithms/adaptive_tau.py; an
    extension, not in the paper): τ ← clip(τ + gain · (target − drop ratio), tau_min, tau_max), starting
    from ``tau``. The τ in use is exported (``gd2po_trainer_tau``, ``tau`` in metrics.jsonl) and kept in
    checkpoints, so a resumed run continues from it."""

    target_drop_ratio: float = Field(ge=0, le=1)
    """Fraction of rollouts the filter should drop. Under the release rule at most the conflict ratio is
    reachable: with fewer conflicting rollouts τ settles at ``tau_max``."""
    gain: float = Field(default=0.5, gt=0, le=10)
    """τ change per unit of drop-ratio error and step: larger moves faster and follows the per-step noise
    more (τ jitters by about gain × the drop ratio's step-to-step spread)."""
    tau_min: float = Field(default=0.0, ge=0, le=1)
    """Lowest τ (0: under the release rule the filter drops nothing; the paper rule still drops every
    rollout without signal, ρ = 0, so a target below that share pins τ here)."""
    tau_max: float = Field(default=1.0, ge=0, le=1)
    """Highest τ (1: every conflicting rollout may be dropped, as GD²PO-Hard)."""

    @model_validator(mode="after")
    def _bounds_ordered(self) -> AdaptiveTauConfig:
        if self.tau_min > self.tau_max:
            raise ValueError(f"tau_min ({self.tau_min}) is above tau_max ({self.tau_max})")
        return self


class GD2POSNRAdvantage(GD2POHardAdvantage):
    """GD²PO-SNR: like Hard, but a conflicting rollout is dropped only when its net signal is weak."""

    estimator: Literal["gd2po_snr"] = "gd2po_snr"  # type: ignore[assignment]
    tau: float = Field(default=0.8, ge=0, le=1)
    """Signal-to-noise threshold τ: a rollout with |ρ| = |Σ A| / Σ |A| below it may be dropped."""
    keep_rule: Literal["release", "paper"] = "release"
    """``release``: drop conflicting rollouts with |ρ| < τ. ``paper``: keep iff |ρ| > τ, tested on every
    rollout (drops rollouts without signal; docs/algorithm.md §4.3)."""
    adaptive_tau: AdaptiveTauConfig | None = None
    """Null: τ stays ``tau`` for the whole run (as in the paper). Set: τ starts at ``tau`` (clipped to the
    bounds) and follows a target drop ratio. Either keep rule: both drop more as τ rises."""

    @model_validator(mode="after")
    def _adaptive_tau_needs_the_filter(self) -> GD2POSNRAdvantage:
        # Without the filter nothing is dropped: the drop ratio stays 0 and τ would only wind up to tau_max.
        if self.adaptive_tau is not None and not self.filter:
            raise ValueError("adaptive_tau steers the drop ratio, which is always 0 with filter: false")
        return self


ADVANTAGE_VARIANTS: tuple[type[_AdvantageBase], ...] = (
    GRPOAdvantage,
    GDPOAdvantage,
    GD2POHardAdvantage,
    GD2POSNRAdvantage,
)
ESTIMATOR_NAMES = tuple(get_args(v.model_fields["estimator"].annotation)[0] for v in ADVANTAGE_VARIANTS)


def _estimator_of(value: Any) -> str | None:
    # The default estimator when the mapping names none, so an override of one option
    # (GD2PO_TRAINER__ADVANTAGE__TAU) on a file without an advantage section still loads.
    if isinstance(value, dict):
        return value.get("estimator", DEFAULT_ESTIMATOR)
    return getattr(value, "estimator", None)


AdvantageConfig = Annotated[
    Annotated[GRPOAdvantage, Tag("grpo")]
    | Annotated[GDPOAdvantage, Tag("gdpo")]
    | Annotated[GD2POHardAdvantage, Tag("gd2po_hard")]
    | Annotated[GD2POSNRAdvantage, Tag("gd2po_snr")],
    Discriminator(
        _estimator_of,
        custom_error_type="unknown_estimator",
        custom_error_message=f"unknown estimator; known: {', '.join(ESTIMATOR_NAMES)}",
    ),
]


# -- trainer: the other sub-sections ---------------------------------------------------------------


class LossConfig(_Section):
    """The PPO-clip policy loss and its optional terms (docs/algorithm.md §8)."""

    clip_low: float = Field(default=0.2, ge=0)
    """Lower ratio clip ε_low: the ratio is clipped to [1 − clip_low, 1 + clip_high]."""
    clip_high: float = Field(default=0.2, ge=0)
    """Upper ratio clip ε_high."""
    dual_clip: float | None = Field(default=3.0, gt=1)
    """Dual clip c (> 1) bounding the loss of negative-advantage tokens; null disables it."""
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    """How token losses are aggregated over a mini-batch."""
    kl_coef: float = Field(default=0.0, ge=0)
    """Weight of a low-variance (k3) KL to a frozen reference policy; 0 (off) in the paper's runs."""
    reference_path: Path | None = None
    """Reference policy for ``kl_coef`` > 0 (default: ``model.path``, the starting policy)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus subtracted from the loss."""
    recompute_old_logprobs: bool = False
    """Recompute π_old with the trainer's policy before the update instead of using the log-probs the
    rollout reported."""


class BroadcastConfig(_Section):
    """``transport: broadcast``: the trainer (rank 0) serves each new version over a process group of its
    own and one rollout engine's workers, one group per transfer (proto/weight_transfer.py), rendezvous
    through a TCPStore it hosts."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Kind of each transfer's group. ``auto``: NCCL (device to device) when the trainer and that engine
    both have a CUDA device and a torch with NCCL, else gloo (host memory). ``nccl``: NCCL only — the
    trainer refuses to start without it, and a transfer to an engine without it fails (the replica
    catches up from the folders). ``gloo``: always gloo. The NCCL path has not run on this project's
    CPU-only machines (docs/architecture.md §4.3.1)."""

    host: str = "127.0.0.1"
    """Address the trainer's store binds to (0.0.0.0 in containers)."""
    advertise: str | None = None
    """Address rollouts connect to (default: ``host``; in compose or Kubernetes the trainer's DNS name).
    Across hosts also set GLOO_SOCKET_IFNAME: gloo connects on its own (docs/architecture.md §4.3.1)."""
    port: int = Field(default=0, ge=0, le=65535)
    """Port of the store; 0 picks a free one (announced in the offer)."""
    timeout: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    """Seconds each side waits for the other: to join a transfer, and for each bucket. A replica that dies
    or hangs fails its own transfer after this, never blocking the trainer or the other replicas."""
    bucket_mib: int = Field(default=256, ge=1)
    """Tensors are sent concatenated in buffers of up to this many MiB (a larger tensor goes alone)."""
    disk_every: int = Field(default=10, ge=1)
    """Also write the safetensors folder every N publishes (and at the first): where a rollout that missed
    a broadcast (restart, late join, failed transfer) catches up from."""


class PublishConfig(_Section):
    """How trained weights reach the rollout: a safetensors folder under ``weights/`` plus an announcement
    (``transport: disk``), or a transfer over a process group with a folder every few versions
    (``transport: broadcast``)."""

    transport: Literal["disk", "broadcast"] = "disk"
    """``disk``: every version is a folder the rollouts reload. ``broadcast``: rollouts receive each
    version from the trainer over gloo (no write and re-read of the whole model), a folder every
    ``broadcast.disk_every`` publishes."""
    broadcast: BroadcastConfig = Field(default_factory=BroadcastConfig)

    every: int = Field(default=1, ge=0)
    """Publish the policy every N steps; 0 never publishes, so the rollout keeps sampling the starting
    policy (the control arm of a learning check)."""
    background: bool = False
    """Write, digest and announce the weights folders on a thread while the next step trains (the snapshot
    copy stays on the step). For GPU trainers; on a CPU core shared with training it only moves the work.
    With ``transport: broadcast`` it applies to the folders written every ``broadcast.disk_every``
    publishes (the offers are packed on the step and served from threads either way)."""
    keep_last: int = Field(default=3, ge=1)
    """Published weight folders kept; older ones are deleted."""


class CheckpointConfig(_Section):
    """DeepSpeed checkpoints (model, optimizer, scheduler, trainer state); a group is acknowledged in
    Redis only once a checkpoint holds its update."""

    every: int = Field(default=5, ge=1)
    """Checkpoint every N steps (and after the last one)."""
    keep_last: int = Field(default=3, ge=1)
    """Checkpoints kept; older ones are deleted."""


class DynamicSamplingConfig(_Section):
    """Informative batches (an extension beyond the paper, DAPO's dynamic sampling for several rewards;
    trainer/sampling.py): a group that carries no signal — every reward equal within it, or the
    estimator keeps none of it (GD²PO κ = 0) — does not count toward the step. The trainer keeps reading
    until it holds ``prompts_per_step`` informative groups or has read ``ceil(oversample ·
    prompts_per_step)``; the groups without signal are acknowledged as skipped (``<ns>:skipped``), or, when
    the bound is reached first, fill the step and the record says so (``informative_groups`` below
    ``groups``). With it the rollout's backlog bound is a formula (docs/architecture.md §2.2)."""

    oversample: float = Field(default=2.0, ge=1, le=16)
    """Most groups read per step, as a multiple of ``prompts_per_step`` (rounded up): the cost bound of one
    step in generated groups. 1 reads no more than without dynamic sampling (only the order changes:
    informative groups first)."""

    def read_limit(self, prompts_per_step: int) -> int:
        """Most groups one step reads: ceil(oversample · prompts_per_step), rounded to 9 decimals first
        (1.1 × 50 is 55.000000000000007 in binary floating point: 55, not 56)."""
        return math.ceil(round(self.oversample * prompts_per_step, 9))


class LoraConfig(_Section):
    """Train LoRA adapters (PEFT) instead of the full model: the base weights stay frozen, the optimizer
    holds the adapters' parameters only, checkpoints save the adapters alone (plus the adapter in PEFT
    format, ``checkpoints/step-N/adapter/``), and the rollout serves the merged policy or the base model
    plus the current adapter (``serve``; docs/operations.md, "LoRA"). Supported with ZeRO stages 0–2."""

    r: int = Field(default=16, ge=1)
    """Rank of each adapter (the inner dimension of B·A)."""
    alpha: float = Field(default=32.0, gt=0)
    """LoRA scaling numerator: the update is (alpha / r)·B·A (Hu et al. 2021, arXiv 2106.09685)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the adapters' input while training. Above 0 the training forward is random, so the
    trainer's log-probs of the current policy no longer equal the sampler's even on-policy."""
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names (suffixes, as PEFT's ``LoraConfig.target_modules``) that get an adapter, or
    ``all-linear`` for every linear layer but the LM head. The default covers the attention and MLP
    projections of Llama/Qwen-style models; a module sharing its weight with another (tied embeddings)
    is refused."""
    serve: Literal["merged", "adapter"] = "merged"
    """How the rollout serves the policy. ``merged``: each publish writes the whole model with
    W + (alpha / r)·B·A merged in (out of place, so the base never drifts) and the rollout reloads it as a
    full model's weights: generation at the base model's speed. ``adapter``: each publish writes the
    adapter alone in PEFT format (a few MB) and the rollout loads it into vLLM's own LoRA support
    (``enable_lora``, one ``LoRARequest`` per policy version) on the base model it started with. vLLM has
    LoRA on CPU and GPU, but on CPU its torch kernels generate ~4× slower than the merged model, which
    costs far more than the merged folder's write and reload (bench/RESULTS.md, "LoRA serving"), hence
    ``merged`` by default; on GPUs (Punica kernels), where a merged publish of a large model is many GB
    written and read per version, ``adapter`` is the one to choose (not measured here: no GPU)."""

    @model_validator(mode="after")
    def _rank_vllm_serves(self) -> LoraConfig:
        if self.serve == "adapter" and self.r > MAX_SERVED_LORA_RANK:
            raise ValueError(
                f"trainer.lora.r {self.r} is above {MAX_SERVED_LORA_RANK}, the largest rank vLLM serves; "
                "lower r or set trainer.lora.serve: merged"
            )
        return self


MAX_SERVED_LORA_RANK = 512
"""vLLM 0.32's largest ``max_lora_rank`` (``vllm.config.lora.MaxLoRARanks``)."""


# Keys of the flat trainer section before it was nested, and where each lives now. An old key is
# refused naming its new place: silently accepting both spellings would leave two names per setting.
MOVED_TRAINER_KEYS = {
    **{
        key: f"advantage.{key}"
        for key in ("estimator", "tau", "norm_by_std", "whiten", "keep_rule", "reweight", "filter")
    },
    **{
        key: f"loss.{key}"
        for key in (
            "clip_low",
            "clip_high",
            "dual_clip",
            "kl_coef",
            "reference_path",
            "entropy_coef",
            "recompute_old_logprobs",
        )
    },
    "loss_agg": "loss.agg",
    "publish_every": "publish.every",
    "background_publish": "publish.background",
    "save_every": "checkpoint.every",
    "keep_last": "checkpoint.keep_last",
}


class TrainerConfig(_Section):
    """The trainer: batch shape, optimizer, staleness, and its sub-sections ``advantage``, ``loss``,
    ``publish`` and ``checkpoint``."""

    host: str = "127.0.0.1"
    """Address of the trainer's metrics/health HTTP server."""
    metrics_port: int = 8300
    """Port of the trainer's metrics/health HTTP server."""
    advantage: AdvantageConfig = Field(default_factory=GD2POSNRAdvantage)
    """The advantage estimator (docs/algorithm.md §3–4) and its options: ``estimator`` selects which
    options apply, and an option of another estimator is refused. Switching ``estimator`` in an
    ``extends:`` file or from the environment starts this section afresh."""
    loss: LossConfig = Field(default_factory=LossConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    prompts_per_step: int = Field(default=8, ge=1)
    """Groups (prompts, each with ``rollout.group_size`` rollouts) per training step."""
    mini_batches: int = Field(default=1, ge=1)
    """Optimizer steps per PPO epoch: the step's rollouts split into this many mini-batches."""
    ppo_epochs: int = Field(default=1, ge=1)
    """Passes over the step's rollouts."""
    lr: float = Field(default=1e-6, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW decoupled weight decay."""
    skip_idle_rows: bool = True
    """Skip the forward/backward of rows whose advantage is 0 everywhere (zero-variance groups, dropped
    rollouts): without a KL or entropy term they add exactly nothing to the gradient, so the update is
    the same, faster."""
    share_prompt_forward: bool = True
    """Forward a group's shared prompt once with gradients and run its G responses on that cache (same
    values and gradients, much less work when prompts are longer than responses). A micro-batch then
    holds whole groups, so turn it off if a group's responses do not fit in memory. Off by itself under
    multi-rank ZeRO-3 (ranks must run equal forwards)."""
    max_staleness: int = Field(default=2, ge=0)
    """Drop groups generated more than this many policy versions ago."""
    max_crashes_per_group: int | None = Field(default=3, ge=1)
    """Dead-letter a group (kind ``crashed_trainer``) once the trainer has died this many times while
    learning on a step that held it: a group that kills the trainer (out of memory, an error) would
    otherwise be redelivered after every restart, a crash loop. Every group of such a step gets the count
    (which one caused it is not known), so usually the whole step is set aside. Null: never (docs/operations.md §6)."""
    conflict_map_sources: int = Field(default=0, ge=0)
    """The conflict map (trainer/conflict_map.py): data sources (the prompts' ``data_source`` column) given
    their own label in the per-source conflict, drop and pair-conflict metrics; sources seen after the
    first N are counted as ``other``, so the number of Prometheus series stays bounded. 0 (the default)
    turns the map off; it costs one estimator pass per source each step (``phase/conflict_map``), and on
    a single-source set it repeats the batch's own ratios. configs/conflict_map_mixed_cpu.yaml sets 8."""
    total_steps: int = Field(default=10, ge=1)
    """Training steps; the trainer exits 0 after the last."""
    total_samples: int | None = Field(default=None, ge=1)
    """Also stop after the step at which the rollouts read reach this many (every group read: trained,
    or skipped by ``dynamic_sampling``; stale ones not counted) — a budget in generated samples, so runs
    with and without dynamic sampling compare at equal cost (bench/learning.py). Null: steps only."""
    dynamic_sampling: DynamicSamplingConfig | None = None
    """Null (the default) trains on the groups as they come; see DynamicSamplingConfig."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more compute)."""
    lora: LoraConfig | None = None
    """Null (the default) trains every weight."""
    deepspeed: dict[str, Any] = Field(
        default_factory=lambda: {
            "zero_optimization": {"stage": 2},
            "gradient_clipping": 1.0,
            "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": 1,
        }
    )
    """DeepSpeed config section, passed to ``deepspeed.initialize``."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_flat_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        moved = {f"trainer.{key}": _moved_to(key) for key in data if key in MOVED_TRAINER_KEYS}
        if moved:
            where = "; ".join(f"{old} is now {new}" for old, new in moved.items())
            raise PydanticCustomError("moved_key", "{where}", {"where": where, "moved": moved})
        return data

    @model_validator(mode="after")
    def _lora_below_zero_3(self) -> TrainerConfig:
        stage = (self.deepspeed.get("zero_optimization") or {}).get("stage", 0)
        if self.lora is not None and int(stage) == 3:
            # ZeRO-3 partitions the frozen base as well: the merged publish and the PEFT-format adapter
            # would have to gather both, a path not built or tested here. With LoRA the optimizer state
            # is adapter-sized, so ZeRO-3's sharding of parameters buys little over stage 2.
            raise ValueError(
                "trainer.lora is not supported with ZeRO-3 (trainer.deepspeed.zero_optimization.stage: 3); "
                "use stage 0, 1 or 2: the adapters' optimizer state is small enough not to need sharding"
            )
        return self

    @model_validator(mode="after")
    def _adapters_go_as_files(self) -> TrainerConfig:
        if self.lora is not None and self.lora.serve == "adapter" and self.publish.transport == "broadcast":
            # An adapter is a few MB written once per version: the process-group transfer exists to spare
            # the write and re-read of a whole model, and it streams into the base weights' load path.
            raise ValueError(
                "trainer.publish.transport: broadcast sends whole models; with trainer.lora.serve: adapter "
                "each version is an adapter folder of a few MB: use transport: disk, or lora.serve: merged"
            )
        return self


def _moved_to(key: str) -> str:
    new = f"trainer.{MOVED_TRAINER_KEYS[key]}"
    place = f"{new} (environment: {env_var(new)})"
    if key == "keep_last":  # one setting became two
        place += " and trainer.publish.keep_last for published weights"
    return f"{place}; see docs/config.md"


class AuthConfig(_Section):
    """Bearer authentication of every service's API."""

    token: SecretStr | None = None
    """Bearer token; set via GD2PO_AUTH__TOKEN only."""


class ExperimentConfig(BaseSettings):
    """The whole experiment. Sections: run, redis, model, data, rewards, rollout, trainer, auth."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        allow_inf_nan=False,
        use_attribute_docstrings=True,
    )

    run: RunConfig = Field(default_factory=RunConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rewards: list[RewardEndpoint] = Field(default_factory=list)
    """The reward dimensions, one service each."""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    sft: SFTConfig | None = None
    synchronous: bool = False
    """Generate only after the trainer caught up (every group on-policy). Needs trainer.publish.every: 1,
    rollout.replicas: 1 and rollout.prompts_per_batch <= trainer.prompts_per_step (refused at load
    otherwise); a trainer still short of groups after reading everything asks the rollout for them at its
    version (a smaller batch, dead-lettered groups, a failed publish, dynamic sampling)."""

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
        if self.synchronous and self.trainer.publish.every != 1:
            raise ValueError(
                "synchronous: true needs trainer.publish.every: 1 (every batch waits for new weights)"
            )
        if self.synchronous and self.rollout.replicas > 1:
            raise ValueError(
                f"synchronous: true needs rollout.replicas: 1, got {self.rollout.replicas} (replicas that "
                "each wait for the trainer all generate at once: their groups outnumber a step's and go "
                "off-policy)"
            )
        sampling = self.trainer.dynamic_sampling
        batch, step = self.rollout.prompts_per_batch, self.trainer.prompts_per_step
        if self.synchronous and batch > step:
            raise ValueError(
                f"synchronous: true needs rollout.prompts_per_batch ({batch}) <= trainer.prompts_per_step "
                f"({step}): the {batch - step} groups a step does not read wait for the next one, a policy "
                "version behind, and a synchronous run promises every group on-policy"
            )
        if sampling is not None and not self.synchronous:
            low, high = self.backlog_limits()
            if low > high:
                raise ValueError(
                    f"trainer.dynamic_sampling.oversample {sampling.oversample} reads up to {low} groups a "
                    f"step, more than trainer.max_staleness ({self.trainer.max_staleness}) x "
                    f"trainer.prompts_per_step ({self.trainer.prompts_per_step}) = {high} the backlog may "
                    "hold before its groups go stale: raise trainer.max_staleness or lower oversample"
                )
        return self

    def backlog_limits(self) -> tuple[int, int]:
        """(lowest, highest) backlog bound under ``trainer.dynamic_sampling`` (docs/architecture.md §2.2):
        at least the most groups a step reads, ceil(oversample · prompts_per_step), so the rollout never
        pauses while the trainer waits inside a step; at most max_staleness · prompts_per_step, so a
        group with fewer groups ahead of it is read within max_staleness steps (every step reads at
        least prompts_per_step)."""
        trainer = self.trainer
        sampling = trainer.dynamic_sampling or DynamicSamplingConfig(oversample=1.0)
        return sampling.read_limit(trainer.prompts_per_step), trainer.max_staleness * trainer.prompts_per_step

    @property
    def backlog_bound(self) -> int:
        """Unconsumed groups at which the rollout pauses (asynchronous mode): ``rollout.max_backlog``, and
        with ``trainer.dynamic_sampling`` that value clamped into :meth:`backlog_limits`."""
        if self.trainer.dynamic_sampling is None:
            return self.rollout.max_backlog
        low, high = self.backlog_limits()
        return min(max(self.rollout.max_backlog, low), high)

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
        # The environment wins over the YAML file (passed as init kwargs), merged as ``extends:`` merges.
        return (_EnvironmentOverFile(settings_cls, file=init_settings, environment=env_settings),)


class _EnvironmentOverFile(PydanticBaseSettingsSource):
    """The environment's values merged over the file's with `_merge`, so an estimator switched from the
    environment (GD2PO_TRAINER__ADVANTAGE__ESTIMATOR=grpo) drops the file's options of the old one
    instead of failing on them."""

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        *,
        file: PydanticBaseSettingsSource,
        environment: PydanticBaseSettingsSource,
    ):
        super().__init__(settings_cls)
        self.file, self.environment = file, environment

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads both sources whole

    def __call__(self) -> dict[str, Any]:
        return _merge(self.file(), self.environment())


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc, message = list(item["loc"]), item["msg"]
        if item["type"] == "moved_key":  # one line per old key, named by its dotted key
            lines += [f"  {old}: moved to {new}" for old, new in item["ctx"]["moved"].items()]
            continue
        if loc[:2] == ["trainer", "advantage"]:
            loc, message = _advantage_error(loc, item)
        key = ".".join(str(part) for part in loc) or "<root>"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def _advantage_error(loc: list[Any], item: Any) -> tuple[list[Any], str]:
    """The dotted key and message of an error in ``trainer.advantage``, whose loc pydantic gives with the
    union's tag inserted (``trainer.advantage.grpo.tau``): the tag is dropped from the key and named in
    the message where it explains the error."""
    if item["type"] == "unknown_estimator":
        if not isinstance(item["input"], dict):
            return loc, f"expected a mapping such as {{estimator: {DEFAULT_ESTIMATOR}, tau: 0.8}}"
        given = item["input"].get("estimator")
        return [*loc, "estimator"], f"unknown estimator {given!r}; known: {', '.join(ESTIMATOR_NAMES)}"
    if len(loc) > 2 and loc[2] in ESTIMATOR_NAMES:
        estimator, loc = loc[2], [*loc[:2], *loc[3:]]
        if item["type"] == "extra_forbidden":
            variant = ADVANTAGE_VARIANTS[ESTIMATOR_NAMES.index(estimator)]
            options = ", ".join(name for name in variant.model_fields if name != "estimator")
            return loc, f"does not apply to estimator {estimator!r} (its options: {options})"
    return loc, item["msg"]


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
    """``override`` over ``base``: mappings merge key by key, anything else replaces. A mapping naming
    another ``estimator`` than the one it overrides replaces it whole: the options of the base's
    estimator need not apply to the new one (``extends:`` files that switch the estimator)."""
    merged = dict(base)
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(value, dict) and isinstance(current, dict) and not _switches_estimator(current, value):
            merged[key] = _merge(current, value)
        else:
            merged[key] = value
    return merged


def _switches_estimator(base: dict[str, Any], override: dict[str, Any]) -> bool:
    return "estimator" in override and override["estimator"] != base.get("estimator", DEFAULT_ESTIMATOR)


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
