"""Publish policy weights for the rollout services: a complete safetensors folder (config + tokenizer),
written to a temporary directory and renamed into place so readers never see half a folder, then
announced as ``{version, path, sha256}`` on the policy key and the events channel. Keeps the last N."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import redis
import torch

from proto import PolicyAnnouncement, encode
from proto.keys import RedisKeys
from proto.weights import weights_digest

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)


def full_state_dict(module: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """Every parameter in full on this rank (gathered from ZeRO-3 partitions when needed), on CPU."""
    gather = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    with gather:
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in module.state_dict().items()}


class WeightPublisher:
    def __init__(self, client: redis.Redis, keys: RedisKeys, root: Path, tokenizer_dir: Path, keep_last: int):
        self.client, self.keys, self.keep_last = client, keys, keep_last
        self.root, self.tokenizer_dir = Path(root), Path(tokenizer_dir)
        self.root.mkdir(parents=True, exist_ok=True)

    def write(self, module: torch.nn.Module, state: dict[str, torch.Tensor], step: int) -> Path:
        final = self.root / f"step-{step}"
        staging = Path(tempfile.mkdtemp(prefix=f".step-{step}-", dir=self.root))
        try:
            module.save_pretrained(staging, state_dict=state, safe_serialization=True)
            for name in TOKENIZER_FILES:
                source = self.tokenizer_dir / name
                if source.is_file():
                    shutil.copy2(source, staging / name)
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return final

    def announce(self, folder: Path, version: int, step: int) -> PolicyAnnouncement:
        announcement = PolicyAnnouncement(
            version=version,
            path=str(folder.resolve()),
            sha256=weights_digest(folder),
            step=step,
            created_at=time.time(),
        )
        payload = encode(announcement)
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.policy, payload)
        pipe.publish(self.keys.events, payload)
        pipe.execute()
        self._prune(keep=folder)
        return announcement

    def _prune(self, keep: Path) -> None:
        folders = sorted(
            (p for p in self.root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1])
        )
        for old in folders[: -self.keep_last]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
