"""Pydantic v2 models of every message on the wire (HTTP bodies and Redis payloads).

Validation is strict where a bad value would silently corrupt training: rewards and log-probs must
be finite, a reward table must be K×G, groups and batches must not be empty, and a failed score
carries no number.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

MAX_ID_LENGTH = 256
#: Largest policy version or step: they travel as msgpack integers, which stop at 64 bits.
INT64_MAX = 2**63 - 1
_DIGEST = re.compile(r"^blake3:[0-9a-f]{64}$")


def _blake3_digest(value: str) -> str:
    if not _DIGEST.match(value):
        raise ValueError("digest must be 'blake3:' followed by 64 lowercase hex characters")
    return value


Blake3Digest = Annotated[str, AfterValidator(_blake3_digest)]
"""``blake3:`` + 64 lowercase hex characters (proto.weights, proto.weight_transfer)."""


class _WireModel(BaseModel):
    """Messages read from streams: unknown fields are ignored so minor versions can add fields."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, frozen=False)


class _RequestModel(BaseModel):
    """HTTP request bodies: unknown fields are refused so a typo is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ChatMessage(_RequestModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class PromptRecord(_WireModel):
    """One training prompt as a rollout service reads it from a dataset."""

    prompt_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    messages: list[ChatMessage] = Field(min_length=1)
    label: str | None = Field(default=None, description="Ground truth passed to reward services.")
    data_source: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)


FinishReason = Literal["stop", "length", "abort"]
"""Why generation of a response ended: a stop token or string, the token limit, or aborted."""


class Completion(_WireModel):
    """One sampled response: what the trainer needs to recompute and compare log-probs."""

    token_ids: list[int] = Field(description="Sampled response token ids (no prompt).")
    logprobs: list[float] = Field(description="Log-prob of each sampled token under the behaviour policy.")
    text: str
    finish_reason: FinishReason

    @field_validator("token_ids")
    @classmethod
    def _non_negative_ids(cls, ids: list[int]) -> list[int]:
        if any(t < 0 for t in ids):
            raise ValueError("token ids must be non-negative")
        return ids

    @model_validator(mode="after")
    def _aligned(self) -> Completion:
        if len(self.logprobs) != len(self.token_ids):
            raise ValueError(
                f"logprobs has {len(self.logprobs)} entries but token_ids has {len(self.token_ids)}"
            )
        if any(lp > 1e-4 for lp in self.logprobs):
            raise ValueError("logprobs must be <= 0")
        return self


class ScoreItem(_RequestModel):
    """One (prompt, completion) pair to score."""

    id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    prompt: str | list[ChatMessage] = Field(description="Chat messages or plain prompt text.")
    completion: str
    label: str | None = Field(default=None, description="Optional ground truth for rule-based rewards.")
    metadata: dict[str, Any] = Field(default_factory=dict)


class ScoreRequest(_RequestModel):
    items: list[ScoreItem] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> ScoreRequest:
        seen: set[str] = set()
        for item in self.items:
            if item.id in seen:
                raise ValueError(f"items: duplicate id {item.id!r}")
            seen.add(item.id)
        return self


class ScoreResult(_WireModel):
    """Per-item outcome. A failed item has ``score=None`` — never a made-up number."""

    id: str
    score: float | None = None
    status: Literal["ok", "error"]
    error: str | None = None

    @model_validator(mode="after")
    def _score_matches_status(self) -> ScoreResult:
        if self.status == "ok" and (self.score is None or self.error is not None):
            raise ValueError("status 'ok' needs a finite score and no error")
        if self.status == "error" and (self.score is not None or not self.error):
            raise ValueError("status 'error' needs an error message and score null")
        return self


class ScoreResponse(_WireModel):
    reward: str
    version: str
    results: list[ScoreResult]


class RewardInfo(_WireModel):
    """What a reward service scores, so clients can check they talk to the right one."""

    name: str
    version: str
    range: tuple[float, float] | None = Field(default=None, description="(low, high) if bounded.")
    higher_is_better: bool = True
    description: str = ""
    model_id: str | None = None


class OpenRLHFRequest(_RequestModel):
    """OpenRLHF remote reward-model request: ``query`` holds prompt+response texts."""

    query: list[str] = Field(min_length=1)
    prompts: list[str] | None = None
    labels: list[str | None] | None = None

    @model_validator(mode="after")
    def _same_lengths(self) -> OpenRLHFRequest:
        for name in ("prompts", "labels"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.query):
                raise ValueError(f"{name} has {len(values)} entries but query has {len(self.query)}")
        return self


class OpenRLHFResponse(_WireModel):
    rewards: list[float]


GENERATION_SECONDS = "generation_seconds"
"""``ScoredGroup.metadata`` key: the rollout's seconds spent generating the group (its batch's generation
time divided by the batch's groups), what a group the trainer skips cost (``trainer.dynamic_sampling``)."""


class ScoredGroup(_WireModel):
    """G completions of one prompt with a K×G reward table: the unit the trainer consumes."""

    group_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    prompt_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    prompt_token_ids: list[int] = Field(min_length=1)
    completions: list[Completion] = Field(min_length=1)
    rewards: dict[str, list[float]] = Field(
        min_length=1, description="Reward name → G finite scores, in completion order."
    )
    policy_version: int = Field(ge=0, le=INT64_MAX)
    created_at: float = Field(description="Unix time generation started.")
    scored_at: float = Field(description="Unix time the last reward arrived.")
    producer_id: str = ""
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="From the rollout: label, data_source (the prompt's), generation_seconds.",
    )

    @model_validator(mode="after")
    def _table_is_k_by_g(self) -> ScoredGroup:
        group_size = len(self.completions)
        for name, scores in self.rewards.items():
            if len(scores) != group_size:
                raise ValueError(
                    f"rewards[{name!r}] has {len(scores)} scores but the group has {group_size} completions"
                )
        return self

    @property
    def group_size(self) -> int:
        return len(self.completions)


class DeadLetter(_WireModel):
    """The one record of the dead-letter stream, whoever writes it: a group (or a stream entry) that will
    not be trained, kept whole with the reason, so nothing produced is lost and it can be inspected or
    replayed. Every producer writes this shape through :func:`proto.deadletter.add_dead_letter`.

    ``kind`` says which promise stopped it:

    * ``reward_failed`` (rollout): a reward still failed after retries. A failure never becomes a score,
      so the group is not published; ``failed_rewards`` names the rewards, ``rewards`` holds those that
      did score.
    * ``untrainable`` (trainer): a ScoredGroup that decodes but that this experiment and model cannot
      train (a configured reward is missing, a token id is outside the vocabulary, the sequence is
      longer than the model's context, every response is empty). Training on it would crash every step
      that includes it, and every restart, as the entry stays pending; the whole group is kept here.
    * ``undecodable`` (trainer): stream entry bytes that are not a ScoredGroup this reader accepts
      (garbage, another schema major version, a non-finite reward). ``raw`` keeps the bytes; the group
      fields are filled as far as they could be read.
    * ``crashed_trainer`` (trainer, schema 2.2): a group in a step the trainer died while training
      ``trainer.max_crashes_per_group`` times (killed, out of memory, an error); left pending, it would
      crash every restart. Every group of such a step gets the count — which one caused it is not known —
      so usually the whole step is kept here, each group whole.

    The fields of the group are those of :class:`ScoredGroup`, each present as far as it is known.
    Schema 2.0 records (all reward failures, ``partial_rewards`` for ``rewards``) still validate.
    """

    kind: Literal["reward_failed", "untrainable", "undecodable", "crashed_trainer"] = Field(
        default="reward_failed", description="Why it was dead-lettered (2.0 records are reward failures)."
    )
    reason: str = Field(min_length=1, description="What went wrong, in words.")
    source: str = Field(default="", description="Who dead-lettered it: 'rollout' or 'trainer'.")
    dead_at: float | None = Field(default=None, description="Unix time it was dead-lettered.")
    entry_id: str | None = Field(
        default=None, description="Id of the entry in the groups stream it came from (trainer only)."
    )
    raw: str | None = Field(
        default=None,
        description="Base64 (RFC 4648) of the entry's message bytes, for kind 'undecodable' (the msgpack "
        "map of all the entry's fields when it has no message field).",
        json_schema_extra={"contentEncoding": "base64"},
    )
    failed_rewards: list[str] = Field(
        default_factory=list, description="Rewards that failed (reward_failed)."
    )
    group_id: str | None = None
    prompt_id: str | None = None
    prompt_token_ids: list[int] = Field(default_factory=list)
    completions: list[Completion] = Field(default_factory=list)
    rewards: dict[str, list[float]] = Field(
        default_factory=dict,
        validation_alias=AliasChoices("rewards", "partial_rewards"),
        description="Reward name → scores, as far as they exist (for reward_failed, the rewards that scored).",
    )
    policy_version: int | None = Field(default=None, ge=0, le=INT64_MAX)
    producer_id: str = ""
    created_at: float | None = None
    scored_at: float | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _complete_for_its_kind(self) -> DeadLetter:
        if self.kind == "reward_failed" and not (self.group_id and self.failed_rewards):
            raise ValueError("a reward_failed dead letter needs group_id and failed_rewards")
        if self.kind in ("untrainable", "crashed_trainer") and not (self.group_id and self.completions):
            raise ValueError(f"a {self.kind} dead letter keeps the group: group_id and completions")
        if self.kind == "undecodable" and self.raw is None:
            raise ValueError("an undecodable dead letter keeps the bytes in raw")
        return self


class PolicyAnnouncement(_WireModel):
    """Where the weights of a policy version live; rollout services reload from it."""

    version: int = Field(ge=0, le=INT64_MAX)
    path: str = Field(min_length=1, description="Directory with safetensors + config + tokenizer.")
    digest: Blake3Digest = Field(
        description="``blake3:`` + 64 hex: digest of the folder's weight files (see proto.weights)."
    )
    step: int = Field(ge=0, le=INT64_MAX)
    created_at: float


class WeightOffer(_WireModel):
    """A policy version the trainer serves over a process group (``trainer.publish.transport: broadcast``,
    proto.weight_transfer): a rollout asks for it with a :class:`WeightRequest` and joins the transfer at
    ``host:port`` (the trainer's TCPStore)."""

    version: int = Field(ge=0, le=INT64_MAX)
    digest: Blake3Digest = Field(description="``blake3:`` + 64 hex over the transferred buffers, in order.")
    step: int = Field(ge=0, le=INT64_MAX)
    host: str = Field(min_length=1, description="Address of the trainer's rendezvous store.")
    port: int = Field(ge=1, le=65535)
    created_at: float


class WeightRequest(_WireModel):
    """A rollout replica asks the trainer for the newest offered weights; it then joins the process group
    under ``transfer/<nonce>`` of the trainer's store."""

    producer_id: str = Field(min_length=1, max_length=200)
    nonce: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    version: int = Field(ge=0, le=INT64_MAX, description="The offered version the replica saw.")
    created_at: float = Field(description="Unix time; the trainer skips requests older than its timeout.")
    receivers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Ranks joining besides the trainer: the engine's workers (its tensor-parallel size).",
    )
    backends: list[Literal["gloo", "nccl"]] = Field(
        default=["gloo"],
        min_length=1,
        max_length=2,
        description="Group kinds the engine's workers can join (NCCL only with CUDA and a torch with NCCL).",
    )


WIRE_MODELS: tuple[type[BaseModel], ...] = (
    PromptRecord,
    Completion,
    ScoreItem,
    ScoreRequest,
    ScoreResult,
    ScoreResponse,
    RewardInfo,
    OpenRLHFRequest,
    OpenRLHFResponse,
    ScoredGroup,
    DeadLetter,
    PolicyAnnouncement,
    WeightOffer,
    WeightRequest,
)
