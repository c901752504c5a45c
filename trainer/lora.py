"""LoRA training (``trainer.lora``): PEFT adapters on a frozen base model.

The invariant this module keeps: the base weights never change, in training or in publishing. The
adapters are injected in place into the base model's linear layers (``peft.get_peft_model``), and the
engine trains that same base model object (``PeftModel.get_base_model()``), so the trainer's forward and
log-prob code (shared-prompt KV cache, ``logits_to_keep``) run unchanged.

The rollout is served the policy one of two ways (``trainer.lora.serve``): the adapter alone in PEFT
format (:func:`adapter_state_dict`, :func:`write_adapter`), which vLLM applies to the base model it
started with; or merged weights W + ΔW computed out of place (:func:`merged_state_dict`) under the base
model's own parameter names, through the ordinary publish path. Merging in place and unmerging afterwards
(TRL's way) would round the fp32 (or bf16) base W at every publish, so the base would drift from the one
the adapters were trained on.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from proto.config import LoraConfig
from proto.weights import ADAPTER_WEIGHTS

if TYPE_CHECKING:
    from peft import PeftModel

ADAPTER = "default"
"""PEFT's name of the one adapter the trainer trains."""
ADAPTER_FOLDER = "adapter"
"""Subfolder of each checkpoint tag holding the adapter in PEFT format (``PeftModel.from_pretrained``)."""


class LoraSetupError(ValueError):
    """``trainer.lora`` cannot be applied to this model; the message names the module and the setting."""


def attach(model: torch.nn.Module, section: LoraConfig, base_path: Path) -> PeftModel:
    """Inject a trainable LoRA adapter into ``model`` in place and freeze every base parameter.

    Returns the ``PeftModel`` (for saving the adapter in PEFT format); the caller trains
    ``peft_model.get_base_model()``, which is ``model`` itself, now holding the adapters. ``base_path`` is
    recorded (absolute) as the adapter's base model, so the saved adapter loads from any directory.
    Raises LoraSetupError when no module matches ``target_modules`` or an adapted weight is shared with
    another module (tied embeddings: the merged publish would update one name and not the other)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=section.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as exc:  # PEFT: "Target modules {...} not found in the base model"
        raise LoraSetupError(f"trainer.lora.target_modules: {exc}") from exc
    peft_model.peft_config[ADAPTER].base_model_name_or_path = str(Path(base_path).resolve())
    owners: dict[int, list[str]] = {}
    for name, parameter in peft_model.get_base_model().named_parameters(remove_duplicate=False):
        owners.setdefault(id(parameter), []).append(name)
    for name, layer in adapted_layers(peft_model.get_base_model()).items():
        shared = owners[id(layer.get_base_layer().weight)]
        if len(shared) > 1:
            raise LoraSetupError(
                f"trainer.lora.target_modules: {name} shares its weight with {sorted(shared)} (tied "
                "embeddings); adapt the attention/MLP projections instead"
            )
    return peft_model


def adapted_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every module holding a LoRA adapter, by its name in ``module``; empty for a plain model."""
    if "peft" not in sys.modules:
        return {}  # no adapter can exist yet; spares full-model runs PEFT's import time at every publish
    from peft.tuners.lora import LoraLayer

    return {name: layer for name, layer in module.named_modules() if isinstance(layer, LoraLayer)}


def merged_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict as the plain base model would have it, with every adapted weight replaced
    by W + ΔW (``LoraLayer.get_delta_weight``: (alpha / r)·B·A in W's layout), computed out of place in
    W's dtype; the adapters' own tensors are left out and ``….base_layer.…`` names lose that part.

    The merged tensors are new and on the CPU; the others are the module's own (copy them before an optimizer step
    changes them). Under ZeRO-3 call it inside a gather of every parameter (not supported: see
    ``proto.config.TrainerConfig``)."""
    layers = adapted_layers(module)
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, layer in layers.items():
            weight = layer.get_base_layer().weight
            delta = layer.get_delta_weight(ADAPTER)
            # Moved to the CPU layer by layer (a no-op on CPU): on a GPU the merged copy of the whole
            # model would otherwise sit in device memory at every publish (~26 GB for a 7B fp32 base).
            merged[f"{name}.weight"] = (weight.float() + delta.float()).to(weight.dtype).cpu()
    state: dict[str, torch.Tensor] = {}
    for key, tensor in module.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        state[key] = merged.get(key, tensor)
    return state


def save_adapter(peft_model: PeftModel, folder: Path) -> Path:
    """Write the adapter in PEFT format (``adapter_model.safetensors`` + ``adapter_config.json``) to
    ``folder``, loadable with ``peft.PeftModel.from_pretrained(base, folder)``; returns ``folder``."""
    folder = Path(folder)
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def is_peft_model(module: object) -> bool:
    """``module`` is a PEFT wrapper (what :func:`attach` returns), not a plain model (which PEFT also gives
    a ``peft_config`` attribute once adapters are injected into it)."""
    if "peft" not in sys.modules:
        return False  # nothing made one; spares full-model runs PEFT's import time at every publish
    from peft import PeftModel

    return isinstance(module, PeftModel)


def adapter_state_dict(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The trained adapter's tensors under PEFT's saved names (``…q_proj.lora_A.weight``; what
    ``get_peft_model_state_dict`` gives), copied to the CPU: they are a few MB, and a copy stays as it was
    while the next optimizer step changes the parameters (a background writer needs that)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=ADAPTER)
    return {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in state.items()}


def write_adapter(peft_model: PeftModel, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Write ``state`` (:func:`adapter_state_dict`) and the adapter's config into ``folder`` as PEFT saves
    them (``adapter_model.safetensors`` + ``adapter_config.json``): loadable by
    ``PeftModel.from_pretrained`` and by vLLM's ``LoRARequest``. The config names the base model by its
    absolute path (:func:`attach`)."""
    save_file(state, Path(folder) / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    peft_model.peft_config[ADAPTER].save_pretrained(str(folder))
