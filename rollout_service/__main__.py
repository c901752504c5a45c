"""``python -m rollout_service --config FILE``: the vLLM rollout service (loop + HTTP API)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

app = typer.Typer(add_completion=False)


@app.command()
def main(
    config: Path = typer.Option(..., exists=True, dir_okay=False, help="Experiment YAML."),
    host: str | None = typer.Option(None, help="Bind address (default rollout.host)."),
    port: int | None = typer.Option(None, help="Port (default rollout.port)."),
    serve_only: bool = typer.Option(
        False,
        help="Only serve the OpenAI API (no training rollouts). Needs no Redis; follows new policies "
        "when Redis is reachable.",
    ),
) -> None:
    """Generate G samples per prompt with vLLM, score them with every reward service, push to Redis."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from proto.config import ConfigError, load_config
    from rollout_service.service import RolloutService

    try:
        experiment = load_config(config)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from exc
    server: uvicorn.Server | None = None

    def stop() -> None:
        server.should_exit = True  # a fatal start-up or loop error ends the process (exit code 1)

    service = RolloutService(experiment, run_loop=not serve_only, on_fatal=stop)
    server = uvicorn.Server(
        uvicorn.Config(
            service.app,
            host=host or experiment.rollout.host,
            port=port or experiment.rollout.port,
            log_level="warning",
            timeout_graceful_shutdown=10,
        )
    )
    server.run()
    if service.failure is not None:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
