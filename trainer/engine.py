"""The policy under DeepSpeed: a Hugging Face causal LM wrapped by ``deepspeed.initialize`` with the
experiment's ZeRO stage, dtype, micro-batch, accumulation and clipping; AdamW from the trainer section.
gloo on CPU, nccl on GPUs; works single-process or under torchrun / the deepspeed launcher."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from proto.config import ExperimentConfig
from trainer.loss import entropy_from_logits, token_logprobs_from_logits


def init_distributed() -> None:
    """Join (or create, for a single process) the process group DeepSpeed expects.

    The rank variables are set even when a group already exists (another library in the same
    process, e.g. an in-process vLLM engine, may have created it): DeepSpeed checks them itself."""
    for name, default in (
        ("RANK", str(dist.get_rank()) if dist.is_initialized() else "0"),
        ("WORLD_SIZE", str(dist.get_world_size()) if dist.is_initialized() else "1"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
    ):
        os.environ.setdefault(name, default)
    if not dist.is_initialized():
        if "MASTER_PORT" not in os.environ:
            from socket import socket

            with socket() as probe:
                probe.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    _forget_stale_deepspeed_world()


def _forget_stale_deepspeed_world() -> None:
    """DeepSpeed caches a clone of the world group once per process (``deepspeed.utils.groups``). When
    that world was torn down since — an in-process vLLM engine destroys the world it created when it
    shuts down — the clone is unregistered and ``deepspeed.initialize`` fails with "Group … is not
    registered": drop it so DeepSpeed clones the current world."""
    from deepspeed.utils import groups

    cached = getattr(groups, "_WORLD_GROUP", None)
    if cached is None:
        return
    try:
        dist.get_global_rank(cached, 0)
    except (ValueError, RuntimeError):
        groups._WORLD_GROUP = None


def deepspeed_config(config: ExperimentConfig) -> dict[str, Any]:
    """The DeepSpeed section, completed with the optimizer and dtype from the experiment."""
    trainer = config.trainer
    ds = copy.deepcopy(trainer.deepspeed)
    ds.setdefault("train_micro_batch_size_per_gpu", 1)
    ds.setdefault("gradient_accumulation_steps", 1)
    ds.setdefault("gradient_clipping", 1.0)
    ds.setdefault("zero_optimization", {"stage": 0})
    ds.setdefault(
        "optimizer",
        {
            "type": "AdamW",
            "params": {"lr": trainer.lr, "weight_decay": trainer.weight_decay, "betas": [0.9, 0.999]},
        },
    )
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch × accumulation × world
    if config.model.dtype == "bfloat16":
        ds.setdefault("bf16", {"enabled": True})
    elif config.model.dtype == "float16":
        ds.setdefault("fp16", {"enabled": True})
    ds.setdefault("steps_per_print", 1 << 30)
    return ds


def autocast_dtype(ds_config: dict[str, Any]) -> torch.dtype | None:
    """The dtype of DeepSpeed's ``torch_autocast`` section when enabled, else None.

    Mixed precision the way Hugging Face's ``bf16=True`` means it: fp32 weights, optimizer state and
    gradients, with the forward's matmuls in bf16 under ``torch.autocast`` — DeepSpeed applies it inside
    its own forward (an autocast opened around the engine is switched off there). On a CPU with bf16
    dot-product instructions a demo group's forward+backward+step is ~1.4× faster with eager attention
    (bench/RESULTS.md, "Trainer mixed precision"); log-probs then differ from an fp32 sampler's by bf16 rounding (docs/operations.md)."""
    section = ds_config.get("torch_autocast") or {}
    if not section.get("enabled", False):
        return None
    name = str(section.get("dtype", "bfloat16")).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"trainer.deepspeed.torch_autocast.dtype: unknown dtype {section.get('dtype')!r}")
    return dtype


def sampling_temperature(config: ExperimentConfig) -> float:
    """The temperature the rollouts were sampled at (``rollout.temperature``), which every log-prob the
    trainer computes uses. Raises ValueError if it is 0 (greedy rollouts have no policy to train)."""
    temperature = config.rollout.temperature
    if temperature <= 0:
        raise ValueError(
            f"rollout.temperature={temperature}: training needs sampled rollouts (temperature > 0); "
            "greedy decoding gives every rollout of a group the same tokens and no log-probs to train on"
        )
    return temperature


class PolicyEngine:
    def __init__(self, config: ExperimentConfig):
        import deepspeed
        from transformers import AutoModelForCausalLM

        init_distributed()
        self.config = config
        self.ds_config = deepspeed_config(config)
        model = AutoModelForCausalLM.from_pretrained(
            config.model.path, dtype=torch.float32, attn_implementation=config.model.attn_implementation
        )
        self.peft_model = None
        """The PEFT wrapper when ``trainer.lora`` is set (for saving the adapter), else None."""
        if config.trainer.lora is not None:
            from trainer.lora import attach

            # The adapters are injected into ``model`` in place and its base weights frozen; DeepSpeed
            # trains the base model object itself, so the log-prob code below sees the module it expects.
            self.peft_model = attach(model, config.trainer.lora, config.model.path)
            model = self.peft_model.get_base_model()
        if config.trainer.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            if self.peft_model is not None:
                # Frozen embeddings give the checkpointed blocks inputs without grad: with re-entrant
                # checkpointing the adapters inside them would then get no gradient at all.
                model.enable_input_require_grads()
        model.config.use_cache = False
        # from_pretrained returns eval mode; training mode makes gradient checkpointing (when configured)
        # take effect. These models use no dropout, so log-probs are the same in both modes.
        model.train()
        # Only trainable parameters reach the optimizer: with LoRA its state is adapter-sized.
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=self.ds_config,
        )
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self.temperature = sampling_temperature(config)
        self.autocast_dtype = autocast_dtype(self.ds_config)  # the reference must compute the same way
        self._measured_grad_norm: float | None = None  # see grad_norm

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def micro_batch_size(self) -> int:
        return int(self.engine.train_micro_batch_size_per_gpu())

    @property
    def accumulation_steps(self) -> int:
        return int(self.engine.gradient_accumulation_steps())

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def zero_stage(self) -> int:
        return int(self.engine.zero_optimization_stage())

    def token_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        *,
        entropy: bool = False,
        share_prompt: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropies) of the current policy at the sampling temperature
        (``rollout.temperature``), [n, L−1] float32 (see ``response_logprobs``)."""
        return response_logprobs(
            self.engine,
            input_ids,
            attention_mask,
            response_mask,
            temperature=self.temperature,
            entropy=entropy,
            share_prompt=share_prompt,
        )

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        """Accumulate ``loss``'s gradient; ``last`` marks the final micro-batch of an optimizer step.

        The caller owns the accumulation boundary (DeepSpeed's manual override) rather than DeepSpeed's
        micro-step counter, because a step has as many micro-batches as it has rows to train — often
        fewer than ``gradient_accumulation_steps`` after the conflict filter — and padding up to the
        configured count cost a full backward per empty micro-batch. DeepSpeed still divides each loss by
        ``gradient_accumulation_steps`` (callers scale by it, see ``trainer.step``)."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def step(self) -> None:
        """After every ``backward``: an optimizer step when that backward was ``last``, else bookkeeping."""
        if self.engine.is_gradient_accumulation_boundary() and self._norm_unreported():
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            self._measured_grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.engine.step()

    def _norm_unreported(self) -> bool:
        """DeepSpeed keeps the global gradient norm only where its optimizer wrapper computes one (ZeRO,
        fp16, bf16); in plain fp32 without ZeRO it clips with the norm and discards it (deepspeed 0.19
        ``_take_model_step``), so the trainer measures it itself, on the gradients the boundary
        backward has already all-reduced."""
        engine = self.engine
        return not (engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled())

    def grad_norm(self) -> float:
        """Global L2 norm of the last optimizer step's gradients, before clipping (NaN before any step)."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._measured_grad_norm
        return float(norm) if norm is not None else float("nan")

    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


class ReferencePolicy:
    """The frozen policy the KL penalty pulls toward (``trainer.loss.reference_path``, by default the starting
    checkpoint): a plain eval-mode module beside the DeepSpeed engine, never updated, never saved.
    Every rank holds it whole, so under ZeRO-3 it costs one unsharded copy per rank. ``temperature`` is
    the policy's (:attr:`PolicyEngine.temperature`): the KL compares the two at the sampling temperature,
    and ``autocast`` the policy's mixed precision (:attr:`PolicyEngine.autocast_dtype`), so that a
    reference equal to the policy scores exactly like it (KL 0) rather than differing by rounding."""

    def __init__(
        self,
        path: Path,
        dtype: str,
        device: torch.device,
        *,
        temperature: float,
        autocast: torch.dtype | None = None,
        attn_implementation: str | None = None,
    ):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
        )
        self.model = model.to(device).eval().requires_grad_(False)
        self.temperature = temperature
        self.autocast = autocast
        self.device_type = device.type

    @torch.no_grad()
    def token_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        """The reference's log-probs at the same sampling temperature as the policy's, [n, L−1]."""
        with torch.autocast(
            self.device_type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None
        ):
            return response_logprobs(
                self.model, input_ids, attention_mask, response_mask, temperature=self.temperature
            )


def response_logprobs(
    model: Callable[..., Any],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    share_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π_T(token t+1 | ≤ t) for every target position t, [n, L−1] float32, zero before the batch's
    first response target; with ``entropy`` also π_T's entropy at those positions (else None).

    π_T is the sampling policy: softmax(logits / ``temperature``), the rollout's ``rollout.temperature``
    (the release's actor divides the logits by the rollout temperature before every log-prob, current,
    old and reference alike: verl ``DataParallelPPOActor._forward_micro_batch``). Raises ValueError
    for a temperature ≤ 0 (greedy decoding has no log-probs to train on).

    The LM head runs only from the first response target on (``logits_to_keep``): no loss term reads a
    prompt position, and with prompts much longer than the answers and a large vocabulary the prompt's
    [length, vocabulary] logits would be most of the activation memory of a forward.

    ``share_prompt``: the caller vouches that the rows may be one group; when they really share their
    prompt (:func:`shares_one_prompt`) it is forwarded once. Callers decide, never the data alone: under
    multi-rank ZeRO-3 every rank must run the same number of forwards."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 to score tokens, got {temperature}")
    targets = response_mask.shape[1]
    active = response_mask.any(dim=0).nonzero()
    first = int(active[0]) if active.numel() else targets
    if share_prompt and shares_one_prompt(input_ids, attention_mask, first) and not _checkpointing(model):
        logits = _logits_after_shared_prompt(model, input_ids, attention_mask, first)
    else:
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=targets + 1 - first
        ).logits[:, :-1]
    if temperature != 1.0:
        logits = logits.div_(temperature)  # in place: the LM head's backward does not need its output
    logprobs = token_logprobs_from_logits(logits, input_ids[:, first + 1 :])
    pad = torch.nn.functional.pad
    return pad(logprobs, (first, 0)), pad(entropy_from_logits(logits), (first, 0)) if entropy else None


def _checkpointing(model: Any) -> bool:
    """Gradient checkpointing in effect: Hugging Face then drops the KV cache the shared path needs."""
    module = getattr(model, "module", model)
    return bool(getattr(module, "is_gradient_checkpointing", False) and module.training)


def shares_one_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int) -> bool:
    """True when every row holds the same unpadded tokens up to position ``first`` (the prompt's last
    token): the G rollouts of one group, whose prompt then needs one forward instead of G."""
    prompt = slice(0, first + 1)
    return (
        input_ids.shape[0] > 1
        and 0 <= first < input_ids.shape[1] - 1
        and bool(attention_mask[:, prompt].all())
        and bool((input_ids[:, prompt] == input_ids[:1, prompt]).all())
    )


def _logits_after_shared_prompt(
    model: Callable[..., Any], input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int
) -> torch.Tensor:
    """[n, L−1−first, V] logits at positions first … L−2, computing the shared prompt once.

    The prompt (positions 0 … first) goes through the model once, with gradients; its key/value cache is
    repeated for the n rows and the responses are run on top of it. Gradients flow through the repeated
    cache back into the one prompt forward, summed over the rows, so values and gradients equal n full
    forwards (tests/unit/test_response_logprobs.py) at the cost of one prompt and n responses instead of
    n prompts and n responses (the saving on the demo: bench/RESULTS.md)."""
    rows, prompt_length = input_ids.shape[0], first + 1
    prompt = model(
        input_ids=input_ids[:1, :prompt_length],
        attention_mask=attention_mask[:1, :prompt_length],
        use_cache=True,
        logits_to_keep=1,  # the prompt's last position predicts the first response token
    )
    cache = prompt.past_key_values
    cache.batch_repeat_interleave(rows)
    responses = model(
        input_ids=input_ids[:, prompt_length:],
        attention_mask=attention_mask,  # prompt + responses: the mask covers the cache too
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=input_ids.shape[1] - prompt_length,
    ).logits
    return torch.cat([prompt.logits.expand(rows, -1, -1), responses[:, :-1]], dim=1)
