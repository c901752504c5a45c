"""The images: hadolint-clean Dockerfiles and one entrypoint that starts every role with real flags."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_tools import DEPLOY, REPO_ROOT, run, venv_tool

DOCKER = DEPLOY / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_hadolint_is_clean(dockerfile: str) -> None:
    result = run([venv_tool("hadolint"), str(DOCKER / dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_image_runs_as_non_root_with_healthcheck(dockerfile: str) -> None:
    text = (DOCKER / dockerfile).read_text()
    runtime = text.rsplit("\nFROM ", 1)[1]  # the last stage is what ships
    assert "\nUSER 10001:10001" in runtime
    assert "HEALTHCHECK" in runtime and 'ENTRYPOINT ["gd2po-entrypoint"]' in runtime


def test_dockerignore_keeps_secrets_out_of_the_build_context() -> None:
    rules = [line for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line[:1] not in "#"]
    assert rules[0] == "**" and ".env" in rules  # deny by default; .env never enters an image


def entrypoint(args: list[str], tmp_path: Path) -> list[str]:
    """Run the entrypoint with a stand-in `python` that prints the argv it was exec'd with."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\nenv | grep ^GD2PO_TRAINER__ | sort\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "GD2PO_PORT": "8000"}
    result = subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_entrypoint_roles(tmp_path: Path) -> None:
    config, bind = "--config /etc/gd2po/config.yaml", "--host 0.0.0.0 --port 8000"
    assert entrypoint(["trainer", "--resume"], tmp_path) == [
        *f"-m trainer {config} --resume".split(),
        "GD2PO_TRAINER__HOST=0.0.0.0",
        "GD2PO_TRAINER__METRICS_PORT=8000",
    ]
    assert entrypoint(["rollout"], tmp_path) == f"-m rollout_service {config} {bind}".split()
    assert entrypoint(["reward", "correctness"], tmp_path) == (
        f"-m reward_service {config} --reward correctness {bind}".split()
    )
    assert entrypoint(["reward", "--scorer", "generic.regex"], tmp_path) == (
        f"-m reward_service {bind} --scorer generic.regex".split()
    )


@pytest.mark.parametrize(
    ("module", "flags"),
    [
        ("trainer", ["--config", "--resume"]),
        ("rollout_service", ["--config", "--host", "--port"]),
        ("reward_service", ["--config", "--reward", "--scorer", "--option", "--host", "--port"]),
    ],
)
def test_entrypoint_flags_exist_in_the_services(module: str, flags: list[str]) -> None:
    result = run([sys.executable, "-m", module, "--help"], env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    for flag in flags:
        assert flag in result.stdout, f"python -m {module} has no {flag}"
