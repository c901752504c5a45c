"""Full DeepSpeed checkpoints (model, optimizer, scheduler; the adapters alone under ``trainer.lora``)
plus the trainer's own state: the step, the policy version and the groups the checkpoint is the first to
hold, so ``--resume`` continues where the run stopped.

The group ledger itself lives in Redis (``trained`` / ``stale`` sets, acknowledged entries); the
checkpoint names the groups whose update it is the first to hold (``committing``), so a crash between
saving it and acknowledging them is finished on resume without training them twice.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainer.engine import PolicyEngine


@dataclass
class TrainerState:
    step: int = 0
    policy_version: int = 0
    groups_trained: int = 0
    samples_read: int = 0
    """Rollouts of the groups read and not dropped as stale: trained, or skipped by
    ``trainer.dynamic_sampling`` (what ``trainer.total_samples`` bounds)."""
    committing: list[str] = field(default_factory=list)
    tau: float | None = None
    """GD²PO-SNR's τ for the next step when ``trainer.advantage.adaptive_tau`` moves it; None otherwise."""


def save(engine: PolicyEngine, directory: Path, state: TrainerState, keep_last: int = 3) -> None:
    """Write tag ``step-N`` (every rank takes part under ZeRO) and prune tags beyond ``keep_last``.

    With ``trainer.lora`` the tag holds the adapters alone: DeepSpeed's files without the frozen base
    (``exclude_frozen_parameters``; resuming reloads the base from ``model.path``) and the adapter in PEFT
    format in ``step-N/adapter/``, written first so that ``latest`` never names a tag without it."""
    tag = f"step-{state.step}"
    lora = engine.peft_model is not None
    if lora and engine.engine.global_rank == 0:
        from trainer.lora import ADAPTER_FOLDER, save_adapter

        save_adapter(engine.peft_model, Path(directory) / tag / ADAPTER_FOLDER)
    with _frozen_aliases_excluded(engine.engine) if lora else contextlib.nullcontext():
        engine.engine.save_checkpoint(
            str(directory), tag=tag, client_state={"trainer": asdict(state)}, exclude_frozen_parameters=lora
        )
    if engine.engine.global_rank == 0:
        tags = sorted(
            (p for p in Path(directory).glob("step-*") if p.is_dir()), key=lambda p: int(p.name[5:])
        )
        for old in tags[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _frozen_aliases_excluded(ds_engine) -> Iterator[None]:
    """Make ``exclude_frozen_parameters`` exclude every name of a frozen weight. DeepSpeed 0.19.8's
    ``module_state_dict`` drops the names ``named_parameters()`` lists, which names a tied weight once:
    the tied LM head (``lm_head.weight``, the embedding's alias) stayed in each LoRA checkpoint, as large
    as the embedding. For the duration of one save, this engine's method drops the aliases too."""
    module = ds_engine.module
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    original = ds_engine.module_state_dict

    def without_frozen(*args, **kwargs):
        state = original(*args, **kwargs)
        for name in frozen if kwargs.get("exclude_frozen_parameters") else ():
            state.pop(name, None)
        return state

    ds_engine.module_state_dict = without_frozen
    try:
        yield
    finally:
        del ds_engine.module_state_dict  # back to the class's method


def load_latest(engine: PolicyEngine, directory: Path) -> TrainerState | None:
    """Restore the newest checkpoint in ``directory``; None when there is none."""
    if not (Path(directory) / "latest").is_file():
        return None
    # A LoRA checkpoint holds no frozen base weights: the module's state is loaded non-strictly, the base
    # keeping what PolicyEngine loaded from model.path.
    _, client_state = engine.engine.load_checkpoint(
        str(directory), load_module_strict=engine.peft_model is None
    )
    return TrainerState(**client_state["trainer"])
