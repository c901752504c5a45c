"""``python -m trainer --config FILE [--resume]``: the DeepSpeed GD²PO trainer service.

Runs single-process, or under ``torchrun --nproc-per-node N -m trainer ...`` / the deepspeed launcher,
on one node or several (``torchrun --nnodes N --rdzv-backend c10d ...``, one process tree per node).
Exit code 0 when ``trainer.total_steps`` are done.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import typer

app = typer.Typer(add_completion=False)


@app.command()
def main(
    config: Path = typer.Option(..., exists=True, dir_okay=False, help="Experiment YAML."),
    resume: bool = typer.Option(False, help="Continue from the newest checkpoint in the run folder."),
    max_steps: int | None = typer.Option(
        None, help="Stop after this many steps (default trainer.total_steps)."
    ),
) -> None:
    """Consume ScoredGroups from Redis, train with GRPO/GDPO/GD²PO, publish weights, export metrics."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(".cache/torch_extensions").resolve()))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from proto.config import ConfigError, load_config
    from proto.startup import StartupError
    from trainer.service import Trainer, UnsupportedOption

    log = logging.getLogger("trainer")
    try:
        trainer = Trainer(load_config(config), resume=resume, max_steps=max_steps)
    except (UnsupportedOption, ConfigError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from exc
    signal.signal(signal.SIGTERM, lambda *_: trainer.stopping.set())
    server = None
    # Global rank 0 exports the metrics; the first process of every other node (its pod) serves only
    # the health routes its probes need. torchrun sets both variables; a single process has neither.
    if int(os.environ.get("RANK", "0")) == 0:
        server = trainer.serve_metrics()
    elif int(os.environ.get("LOCAL_RANK", "0")) == 0:
        server = trainer.serve_metrics(export=False)
    try:
        state = trainer.run()
    except StartupError as exc:
        log.error("%s", exc)  # one line naming what is missing and the setting to change
        raise typer.Exit(1) from None
    log.info("stopped at step %d (policy version %d)", state.step, state.policy_version)
    if server is not None:
        server.should_exit = True


if __name__ == "__main__":
    app()
