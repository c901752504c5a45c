"""``python -m reward_service``: serve one reward dimension with uvicorn.

Either name a scorer directly (``--scorer tool_call.correctness --port 8101 --option key=value``) or
pick a reward of an experiment config (``--config FILE --reward correctness``), whose ``launch``
section names the scorer and its options.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer
import uvicorn

app = typer.Typer(add_completion=False)


def _parse_options(pairs: list[str]) -> dict[str, object]:
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"{pair!r}: expected key=value", param_hint="--option")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


@app.command()
def main(
    scorer: str | None = typer.Option(None, help="Registered scorer name, e.g. tool_call.correctness."),
    config: Path | None = typer.Option(None, exists=True, dir_okay=False, help="Experiment YAML."),
    reward: str | None = typer.Option(None, help="Reward name in the config's `rewards` list."),
    option: list[str] = typer.Option([], help="Scorer option key=value (JSON values accepted)."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8101),
) -> None:
    """Serve one reward: POST /v1/score, GET /v1/info, /v1/openrlhf, /healthz, /readyz, /metrics."""
    from proto.config import ConfigError, load_config
    from reward_service.app import create_app
    from reward_service.scorers import build_scorer

    # Warnings and errors only: a judge's HTTP client logs every request at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = _parse_options(option)
    try:
        experiment = load_config(config)  # without a file: defaults + GD2PO_* environment (auth token)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from exc
    token = experiment.auth.token.get_secret_value() if experiment.auth.token else None
    if config is not None:
        if reward is None:
            raise typer.BadParameter("--reward is required with --config", param_hint="--reward")
        entry = next((r for r in experiment.rewards if r.name == reward), None)
        if entry is None or entry.launch is None:
            raise typer.BadParameter(
                f"no reward {reward!r} with a launch section in {config}", param_hint="--reward"
            )
        scorer = scorer or entry.launch.scorer
        options = {**entry.launch.options, **options}
    if scorer is None:
        raise typer.BadParameter("give --scorer, or --config with --reward", param_hint="--scorer")
    try:
        instance = build_scorer(scorer, options)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--scorer/--option") from exc
    server: uvicorn.Server | None = None
    failed = False

    def stop() -> None:  # the scorer could not load: end the process with exit code 1
        nonlocal failed
        failed = server.should_exit = True

    server = uvicorn.Server(
        uvicorn.Config(
            create_app(instance, token=token, name=reward, on_fatal=stop),
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=10,
        )
    )
    server.run()
    if failed:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
