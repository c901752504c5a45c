"""Run the API-Bank evaluation against any OpenAI-compatible chat endpoint (greedy, seed 42), or against
a model folder or a run's newest published policy, served for the occasion by vLLM's OpenAI server as a
child process on 127.0.0.1 and stopped afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import httpx
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter
from tqdm.asyncio import tqdm

from gd2po.apibank import Sample, SampleScore, load_api_bank, score_sample, summarise
from gd2po.environment import process_environment
from gd2po.ports import free_port
from gd2po.processes import Child
from proto.weights import is_adapter_folder

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


SERVED_NAME = "policy"
_STEP = re.compile(r"^step-(\d+)$")


def model_folder(path: Path) -> Path:
    """The weights to evaluate: ``path`` itself when it holds a model (config.json + safetensors) or a
    PEFT adapter (adapter_config.json + adapter_model.safetensors, e.g. a LoRA checkpoint's
    ``checkpoints/step-N/adapter``; :func:`servable` merges it), else the newest complete
    ``weights/step-N`` of the run folder ``path`` (a whole model, or an adapter when the run published
    adapters: ``trainer.lora.serve: adapter``). Raises FileNotFoundError naming what was looked for."""
    path = Path(path)
    if is_adapter_folder(path):
        adapter_base(path)  # its base must be here too: say so now, not after minutes of work
        return path
    if _is_model_folder(path):
        return path
    steps = [
        (int(match.group(1)), folder)
        for folder in (path / "weights").glob("step-*")
        if (match := _STEP.match(folder.name)) and (_is_model_folder(folder) or is_adapter_folder(folder))
    ]
    if not steps:
        raise FileNotFoundError(
            f"{path} is neither a model folder (config.json + *.safetensors), nor a PEFT adapter folder "
            "(adapter_config.json + adapter_model.safetensors), nor a run folder with published weights "
            "(weights/step-N/)"
        )
    return model_folder(max(steps)[1])


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def adapter_base(folder: Path) -> Path:
    """The base model folder of the PEFT adapter in ``folder``: its ``base_model_name_or_path`` (the
    trainer records ``model.path`` as an absolute path). Raises FileNotFoundError when that is not a
    model folder on this machine."""
    recorded = json.loads((Path(folder) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    base = Path(recorded or "")
    if not recorded or not (base / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder}: the adapter's base model ({recorded!r}, adapter_config.json "
            "base_model_name_or_path) is not a model folder on this machine; copy the base model there or "
            "edit that field"
        )
    return base


@contextlib.contextmanager
def servable(folder: Path) -> Iterator[Path]:
    """A model folder vLLM can serve for ``folder``: the folder itself, or for a PEFT adapter folder its
    base model (:func:`adapter_base`) with the adapter merged in (``merge_and_unload``), written with the
    base's tokenizer to a temporary folder that is removed when the block exits. vLLM's own LoRA serving
    is not used: the merged folder serves at the base model's speed. Raises FileNotFoundError as
    :func:`adapter_base`."""
    folder = Path(folder)
    if not is_adapter_folder(folder):
        yield folder
        return
    import tempfile

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = adapter_base(folder)
    with tempfile.TemporaryDirectory(prefix="gd2po-merged-") as merged:
        # fp32: the evaluation serves fp32 (``served``), and merging in a lower precision would round W + ΔW.
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        PeftModel.from_pretrained(model, folder).merge_and_unload().save_pretrained(merged)
        AutoTokenizer.from_pretrained(base).save_pretrained(merged)
        yield Path(merged)


@contextlib.contextmanager
def served(
    folder: Path, *, max_model_len: int, log_path: Path, dtype: str = "float32", timeout: float = 300.0
) -> Iterator[str]:
    """Serve ``folder`` with vLLM's OpenAI server (as ``policy``) on a free loopback port for the
    duration of the block; yields its base URL. The server is stopped (SIGTERM, then SIGKILL) on exit,
    error or Ctrl-C. Raises RuntimeError with the tail of its log if it dies or is not ready in time."""
    port = free_port()
    child = Child(
        name="eval-vllm",
        command=[
            *(sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)),
            *("--served-model-name", SERVED_NAME, "--dtype", dtype, "--max-model-len", str(max_model_len)),
            *("--host", "127.0.0.1", "--port", str(port), "--seed", "42", "--enforce-eager"),
        ],
        log_path=log_path,
        env=process_environment(),
    ).start(cwd=Path.cwd())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                if child.exit_code() is not None:
                    raise RuntimeError(f"vLLM exited with code {child.exit_code()}:\n{child.log_tail()}")
                try:
                    if client.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vLLM not ready after {timeout:.0f} s:\n{child.log_tail()}")
                time.sleep(1.0)
        yield url
    finally:
        child.stop()
