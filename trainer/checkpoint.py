"""Full DeepSpeed checkpoints (model, optimizer, scheduler) plus the trainer's own state: the step,
the policy version and the groups the checkpoint is the first to hold, so ``--resume`` continues where
the run stopped.

The group ledger itself lives in Redis (``trained`` / ``stale`` sets, acknowledged entries); the
checkpoint names the groups whose update it is the first to hold (``committing``), so a crash between
saving it and acknowledging them is finished on resume without training them twice.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainer.engine import PolicyEngine


@dataclass
class TrainerState:
    step: int = 0
    policy_version: int = 0
    groups_trained: int = 0
    committing: list[str] = field(default_factory=list)
    tau: float | None = None
    """GD²PO-SNR's τ for the next step when ``trainer.advantage.adaptive_tau`` moves it; None otherwise."""


def save(engine: PolicyEngine, directory: Path, state: TrainerState, keep_last: int = 3) -> None:
    """Write tag ``step-N`` (every rank takes part under ZeRO) and prune tags beyond ``keep_last``."""
    engine.engine.save_checkpoint(
        str(directory), tag=f"step-{state.step}", client_state={"trainer": asdict(state)}
    )
    if engine.engine.global_rank == 0:
        tags = sorted(
            (p for p in Path(directory).glob("step-*") if p.is_dir()), key=lambda p: int(p.name[5:])
        )
        for old in tags[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def load_latest(engine: PolicyEngine, directory: Path) -> TrainerState | None:
    """Restore the newest checkpoint in ``directory``; None when there is none."""
    if not (Path(directory) / "latest").is_file():
        return None
    _, client_state = engine.engine.load_checkpoint(str(directory))
    return TrainerState(**client_state["trainer"])
