"""LLM-as-judge scorer: asks any OpenAI-compatible chat endpoint to grade with a rubric and parses a
number from the answer. A reply without a number in range is that item's error, never a 0."""

from __future__ import annotations

import re

import httpx

from proto import ChatMessage, RewardInfo, ScoreItem
from reward_service.scorers.base import ItemScore, Scorer, per_item, register_scorer

DEFAULT_RUBRIC = (
    "Rate how well the assistant's answer serves the user's request, from {low} to {high} "
    "({high} = excellent). Reply with the number only."
)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def _prompt_text(prompt: str | list[ChatMessage]) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.role}: {m.content}" for m in prompt)


@register_scorer("judge.openai")
class OpenAIJudge(Scorer):
    blocking = True

    def __init__(
        self,
        base_url: str,
        model: str,
        rubric: str = DEFAULT_RUBRIC,
        low: float = 1.0,
        high: float = 10.0,
        api_key: str | None = None,
        timeout: float = 60.0,
        name: str = "judge",
    ):
        self.model, self.rubric, self.low, self.high, self.name = model, rubric, low, high, name
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers)

    def info(self) -> RewardInfo:
        return RewardInfo(
            name=self.name,
            version=self.version,
            range=(self.low, self.high),
            description=f"judge {self.model}",
            model_id=self.model,
        )

    def _one(self, item: ScoreItem) -> float:
        messages = [
            {"role": "system", "content": self.rubric.format(low=self.low, high=self.high)},
            {
                "role": "user",
                "content": f"Request:\n{_prompt_text(item.prompt)}\n\nAnswer:\n{item.completion}",
            },
        ]
        response = self.client.post(
            "/v1/chat/completions",
            json={"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": 16},
        )
        response.raise_for_status()
        reply = response.json()["choices"][0]["message"]["content"] or ""
        found = _NUMBER.search(reply)
        if found is None:
            raise ValueError(f"judge reply has no number: {reply[:80]!r}")
        value = float(found.group())
        if not self.low <= value <= self.high:
            raise ValueError(f"judge score {value} outside [{self.low}, {self.high}]")
        return value

    def score(self, items: list[ScoreItem]) -> list[ItemScore]:
        return per_item(items, self._one)
