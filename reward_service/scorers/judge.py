"""LLM-as-judge scorer: asks any OpenAI-compatible chat endpoint to grade with a rubric and parses the
grade from the answer. A reply without one clear grade in range is that item's error, never a 0."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx

from proto import ChatMessage, RewardInfo, ScoreItem
from reward_service.scorers.base import ItemScore, Scorer, per_item, register_scorer

DEFAULT_RUBRIC = (
    "Rate how well the assistant's answer serves the user's request, from {low} to {high} "
    "({high} = excellent). Reply with the number only."
)
_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_ANY_NUMBER = re.compile(_NUMBER)
# Ways judges mark their grade, most explicit first: "[[7]]", "Score: 7" / "final rating is 7", "7/10".
_MARKED = (
    re.compile(rf"\[\[\s*({_NUMBER})\s*\]\]"),
    re.compile(rf"\b(?:score|rating|grade)\b\W{{0,3}}(?:is\s+|of\s+)?\**\s*({_NUMBER})", re.IGNORECASE),
    re.compile(rf"({_NUMBER})\s*/\s*\d+"),
)


def parse_grade(reply: str) -> float:
    """The last marked grade in the reply, else its only number. Several unmarked numbers (e.g. a
    numbered rubric without a final score) are ambiguous: an error, never a guess."""
    for pattern in _MARKED:
        marked = pattern.findall(reply)
        if marked:
            return float(marked[-1])
    numbers = _ANY_NUMBER.findall(reply)
    if len(numbers) == 1:
        return float(numbers[0])
    problem = "has no number" if not numbers else f"is ambiguous ({len(numbers)} unmarked numbers)"
    raise ValueError(f"judge reply {problem}: {reply[:80]!r}")


def _prompt_text(prompt: str | list[ChatMessage]) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.role}: {m.content}" for m in prompt)


@register_scorer("judge.openai")
class OpenAIJudge(Scorer):
    def __init__(
        self,
        base_url: str,
        model: str,
        rubric: str = DEFAULT_RUBRIC,
        low: float = 1.0,
        high: float = 10.0,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_tokens: int = 16,
        concurrency: int = 8,
        name: str = "judge",
    ):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.model, self.rubric, self.low, self.high, self.name = model, rubric, low, high, name
        self.max_tokens, self.concurrency = max_tokens, concurrency
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Accept both the server root and the OpenAI-style ``…/v1`` base URL.
        root = base_url.rstrip("/").removesuffix("/v1")
        self.client = httpx.Client(base_url=root, timeout=timeout, headers=headers)

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
            json={
                "model": self.model,
                "messages": messages,
                "temperature": 0.0,
                "max_tokens": self.max_tokens,
            },
        )
        response.raise_for_status()
        reply = response.json()["choices"][0]["message"]["content"] or ""
        value = parse_grade(reply)
        if not self.low <= value <= self.high:
            raise ValueError(f"judge score {value} outside [{self.low}, {self.high}]")
        return value

    def score(self, items: list[ScoreItem]) -> list[ItemScore]:
        # One judge call per item is network-bound: keep several in flight, as a vLLM server batches them.
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(lambda item: per_item([item], self._one)[0], items))
