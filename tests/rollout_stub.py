"""The rollout's real HTTP layer (``rollout_service.api``) over a stub engine, for tests of the HTTP
contract only (hostile input, fuzzing): what the engine generates is irrelevant there, and a vLLM
engine per test would cost seconds. Everything else about the rollout is tested with real vLLM."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from fastapi import FastAPI

from proto import Completion
from proto.keys import RedisKeys
from rollout_service.api import create_api
from rollout_service.engine import Sampling
from rollout_service.metrics import RolloutMetrics
from rollout_service.weights import PolicyFollower


class StubEngine:
    """Answers like the engine: token ids of the prompt, ``n`` short completions, reloads recorded."""

    def __init__(self) -> None:
        self.reloaded: list[Path] = []

    def prompt_ids(self, messages: list[dict[str, str]] | str) -> list[int]:
        text = messages if isinstance(messages, str) else "".join(m["content"] for m in messages)
        return list(text.encode()[-64:]) or [0]

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[list[Completion]]:
        size = min(sampling.max_tokens, 4)
        one = Completion(
            token_ids=[1] * size, logprobs=[-0.5] * size, text="x" * size, finish_reason="length"
        )
        return [[one] * sampling.n for _ in prompts]

    def reload(self, weights_dir: Path) -> None:
        self.reloaded.append(Path(weights_dir))


def stub_rollout_app(*, token: str | None, weights_root: Path, max_body: int | None = None) -> FastAPI:
    """The rollout API, ready at once, following no Redis (manual reloads only)."""
    engine = StubEngine()
    metrics = RolloutMetrics()
    follower = PolicyFollower(engine, None, RedisKeys(), metrics)
    limits = {} if max_body is None else {"max_body": max_body}
    return create_api(
        SimpleNamespace(engine=engine, policy=follower),
        metrics=metrics,
        token=token,
        is_ready=lambda: True,
        is_alive=lambda: True,
        weights_root=weights_root,
        **limits,
    )
