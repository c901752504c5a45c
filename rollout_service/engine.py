"""The vLLM engine, in-process: G samples per prompt with the sampled tokens' log-probs (of the sampling
distribution), chat templates, prompt lengths, and in-place weight reloads. One engine serves training
rollouts and the OpenAI-compatible routes; a lock serialises calls because the offline ``LLM`` API is
not re-entrant.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from proto import Completion
from proto.config import ModelConfig

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in-process: seconds, not tens


@dataclass(frozen=True)
class Sampling:
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    stop: tuple[str, ...] = ()
    seed: int | None = None


class Engine:
    def __init__(
        self, model: ModelConfig, *, seed: int = 0, kv_cache_gib: float = 1.0, enforce_eager: bool = True
    ):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gib))))
        from vllm import LLM

        self.model_config = model
        max_model_len = min(model.max_prompt_tokens + model.max_response_tokens, _position_limit(model.path))
        self.max_prompt_tokens = max_model_len - model.max_response_tokens
        if self.max_prompt_tokens <= 0:
            raise ValueError(
                f"model.max_response_tokens={model.max_response_tokens} leaves no room for a prompt"
            )
        self.llm = LLM(
            model=str(model.path),
            dtype=model.dtype,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            seed=seed,
            # Log-probs of the distribution tokens are drawn from (logits ÷ temperature, after top-k/top-p),
            # not of the temperature-1 model: the behaviour policy the trainer's ratio divides by.
            logprobs_mode="processed_logprobs",
            # Reloads that keep a tied output layer current, and weights received over a process group.
            worker_extension_cls="rollout_service.worker_extension.GD2POWorkerExtension",
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.lock = threading.Lock()

    def _prompt_text(self, messages: list[dict[str, str]] | str) -> str:
        if isinstance(messages, str):
            return messages
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prompt_ids(self, messages: list[dict[str, str]] | str) -> list[int]:
        """Chat-template the messages (plain text is used as is) and keep the last max_prompt_tokens."""
        ids = self.tokenizer(self._prompt_text(messages), add_special_tokens=False)["input_ids"]
        return ids[-self.max_prompt_tokens :]

    def prompt_lengths(self, prompts: list[list[dict[str, str]] | str]) -> list[int]:
        """Token count of each prompt as :meth:`prompt_ids` renders it, before any truncation (one
        batched tokenizer call). The release measures the same: the chat template with the generation
        prompt (verl ``RLHFDataset.maybe_filter_out_long_prompts``)."""
        if not prompts:
            return []
        texts = [self._prompt_text(messages) for messages in prompts]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[list[Completion]]:
        """``sampling.n`` completions per prompt, each with the log-prob of every sampled token under the
        sampling distribution: log softmax(logits / ``sampling.temperature``), renormalised over the
        top-p nucleus when ``top_p`` < 1 (vLLM's ``processed_logprobs``). Greedy requests
        (temperature 0) get the temperature-1 log-probs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            logprobs=0,  # the sampled token's own log-prob
        )
        with self.lock:
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
            )
        return [[_completion(sample) for sample in output.outputs] for output in outputs]

    def reload(self, weights_dir: Path) -> None:
        """Load new weights in place (same architecture); the KV cache and compiled graphs are kept. Through
        the worker extension, so a tied output layer follows the new embeddings."""
        with self.lock:
            self.llm.collective_rpc(
                "gd2po_reload_folder", kwargs={"weights_path": str(Path(weights_dir).resolve())}
            )
            self.llm.reset_prefix_cache()

    def receive(self, host: str, port: int, nonce: str, timeout_s: float) -> dict:
        """Receive a policy over the trainer's process group and load it in place (the worker extension
        :class:`rollout_service.worker_extension.GD2POWorkerExtension`). Returns ``{"version", "digest",
        "bytes"}``; raises :class:`proto.weight_transfer.WeightTransferError` with the weights unchanged."""
        with self.lock:
            (result,) = self.llm.collective_rpc(
                "gd2po_receive_weights",
                kwargs={"host": host, "port": port, "nonce": nonce, "timeout_s": timeout_s},
            )
            self.llm.reset_prefix_cache()
        return result


def _position_limit(model_dir: Path) -> int:
    """The model's context length from its config.json (prompt + response must fit in it)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("max_position_embeddings") or 1 << 30)


def _completion(sample) -> Completion:
    token_ids = list(sample.token_ids)
    logprobs = [step[token].logprob for step, token in zip(sample.logprobs, token_ids, strict=True)]
    finish = sample.finish_reason if sample.finish_reason in ("stop", "length") else "abort"
    return Completion(token_ids=token_ids, logprobs=logprobs, text=sample.text, finish_reason=finish)
