"""Publish policy weights for the rollout services: a complete safetensors folder (config + tokenizer), or
under ``trainer.lora.serve: adapter`` the adapter alone in PEFT format, written to a temporary directory
and renamed into place so readers never see half a folder, then announced as ``{version, path, digest}``
on the policy key and the events channel. Keeps the last N.

The weights are written straight from the parameters with ``safetensors.save_file`` (no state-dict copy,
none of ``save_pretrained``'s sharding and conversion passes): publishing is on the critical path of every
step, and those passes were a large part of its cost (bench/RESULTS.md, Pipeline). ``BackgroundPublisher`` takes the write off
that path entirely (``trainer.publish.background``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import redis
import torch
from safetensors.torch import save_file

from proto import PolicyAnnouncement, encode
from proto.keys import RedisKeys
from proto.weights import weights_digest
from trainer.lora import adapted_layers, is_peft_model, merged_state_dict, write_adapter

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


def full_state_dict(
    module: torch.nn.Module, zero_stage: int, *, snapshot: bool = False
) -> dict[str, torch.Tensor]:
    """Every tensor in full on this rank, on CPU, each storage once (tied weights keep their first name,
    as ``save_pretrained`` does). Below ZeRO-3, CPU parameters are returned as they are unless
    ``snapshot`` asks for a copy the optimizer cannot change (a background writer needs one); ZeRO-3
    partitions are gathered and always copied. A module holding LoRA adapters (``trainer.lora``) gives
    the merged weights W + ΔW under the base model's names (:func:`trainer.lora.merged_state_dict`), so
    the rollout reloads them like any full model's."""
    gather = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    seen: set[tuple[int, tuple[int, ...]]] = set()
    state = {}
    with gather:
        tensors = merged_state_dict(module) if adapted_layers(module) else module.state_dict()
        for name, tensor in tensors.items():
            key = (tensor.data_ptr(), tuple(tensor.shape))
            if key in seen:
                continue
            seen.add(key)
            state[name] = tensor.detach().to("cpu", copy=snapshot or zero_stage == 3).contiguous()
    return state


FAULT_PUBLISH_ENV = "GD2PO_FAULT_FAIL_PUBLISH_FILE"
"""Fault hook for chaos tests (``bench.chaos``): when this variable names a file and the file exists as
a publish starts, the file is removed and that publish fails with an OSError, as a full or vanished disk
would make it fail (a read-only folder does not stop root). Unset, nothing is checked."""


def _injected_fault() -> None:
    trigger = os.environ.get(FAULT_PUBLISH_ENV)
    if trigger:
        try:
            os.remove(trigger)
        except FileNotFoundError:
            return
        raise OSError(f"injected publish fault ({FAULT_PUBLISH_ENV}={trigger})")


class WeightPublisher:
    def __init__(self, client: redis.Redis, keys: RedisKeys, root: Path, tokenizer_dir: Path, keep_last: int):
        self.client, self.keys, self.keep_last = client, keys, keep_last
        self.root, self.tokenizer_dir = Path(root), Path(tokenizer_dir)
        self.root.mkdir(parents=True, exist_ok=True)

    def write(self, module: torch.nn.Module, state: dict[str, torch.Tensor], step: int) -> Path:
        _injected_fault()
        final = self.root / f"step-{step}"
        staging = Path(tempfile.mkdtemp(prefix=f".step-{step}-", dir=self.root))
        try:
            if is_peft_model(module):  # trainer.lora.serve: adapter — the rollout keeps its base model
                write_adapter(module, state, staging)
            else:
                save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
                module.config.save_pretrained(staging)
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

    def publish(
        self, module: torch.nn.Module, state: dict[str, torch.Tensor], version: int, step: int
    ) -> None:
        self.announce(self.write(module, state, step), version, step)

    def close(self) -> None:
        """Nothing in flight: publishing is synchronous."""

    def announce(self, folder: Path, version: int, step: int) -> PolicyAnnouncement:
        announcement = PolicyAnnouncement(
            version=version,
            path=str(folder.resolve()),
            digest=weights_digest(folder),
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


class BackgroundPublisher:
    """Writes, digests and announces on one worker thread while the next step trains.

    Meant for GPU trainers, where the write of a multi-GB folder would otherwise stall the devices:
    the caller hands over a snapshot (``full_state_dict(..., snapshot=True)``), at most one publish is in
    flight (the next waits for it, so versions are announced in order and at most two snapshots exist), a
    failed publish is raised at the next call instead of lost, and ``close`` waits for the last one."""

    def __init__(self, publisher: WeightPublisher):
        self.publisher = publisher
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-publisher")
        self._pending: Future | None = None

    def publish(
        self, module: torch.nn.Module, state: dict[str, torch.Tensor], version: int, step: int
    ) -> None:
        self._wait()
        self._pending = self._worker.submit(self.publisher.publish, module, state, version, step)

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self._worker.shutdown()

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
