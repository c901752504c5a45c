"""Policies a rollout engine has never served, for the weight-transfer tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from trainer.publisher import full_state_dict


def perturbed_policy(model_dir: Path, seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model at ``model_dir`` with every weight moved by seeded noise (sd 0.02), and the state dict the
    trainer would publish for it."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model, full_state_dict(model, zero_stage=0, snapshot=True)
