"""Run the API-Bank evaluation against any OpenAI-compatible chat endpoint (greedy, seed 42)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from pathlib import Path

import httpx
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter
from tqdm.asyncio import tqdm

from gd2po.apibank import Sample, SampleScore, load_api_bank, score_sample, summarise

DEFAULT_DATA = Path("data/tool_calling/api_bank")


class _Retryable(Exception):
    """A 5xx/429 answer or a transport error: worth another try."""


async def _generate(
    client: httpx.AsyncClient, sample: Sample, *, model: str, max_tokens: int, limit: asyncio.Semaphore
) -> str:
    body = {
        "model": model,
        "messages": [{"role": "system", "content": sample.system}, {"role": "user", "content": sample.user}],
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 42,
        "max_tokens": max_tokens,
    }

    @retry(
        retry=retry_if_exception_type(_Retryable),
        stop=stop_after_attempt(4),
        wait=wait_exponential_jitter(initial=0.5, max=8),
        reraise=True,
    )
    async def call() -> str:
        try:
            response = await client.post("/v1/chat/completions", json=body)
        except httpx.TransportError as exc:
            raise _Retryable(str(exc)) from exc
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retryable(f"{response.status_code}: {response.text[:200]}")
        response.raise_for_status()
        return response.json()["choices"][0]["message"]["content"] or ""

    async with limit:
        return (await call()).strip()


async def _run(
    samples: list[Sample], base_url: str, model: str, max_tokens: int, concurrency: int, token: str | None
) -> list[tuple[Sample, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600.0, headers=headers) as client:
        outputs = await tqdm.gather(
            *(_generate(client, s, model=model, max_tokens=max_tokens, limit=limit) for s in samples),
            desc="API-Bank",
        )
    return list(zip(samples, outputs, strict=True))


def evaluate_api_bank(
    base_url: str,
    *,
    model: str = "policy",
    data_dir: Path = DEFAULT_DATA,
    limit: int | None = None,
    max_tokens: int = 4096,
    concurrency: int = 8,
    token: str | None = None,
    output: Path | None = None,
) -> tuple[dict[str, dict[str, float]], list[SampleScore]]:
    """Generate for every sample (or the first ``limit`` of each level), score, summarise."""
    samples = load_api_bank(data_dir)
    if limit is not None:
        samples = [s for level in (1, 2, 3) for s in [x for x in samples if x.level == level][:limit]]
    generated = asyncio.run(_run(samples, base_url, model, max_tokens, concurrency, token))
    scores = [score_sample(sample, text) for sample, text in generated]
    summary = summarise(scores)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        with output.open("w") as handle:
            for (_, text), score in zip(generated, scores, strict=True):
                handle.write(json.dumps({**asdict(score), "output": text}) + "\n")
    return summary, scores
