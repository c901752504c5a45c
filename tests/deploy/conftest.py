"""Fixtures of the deploy test (`make test-deploy`): a private Docker engine started and stopped by its
PID, the images built (deploy/test/build-images.sh), and the CPU profile of docker-compose.yml up with
deploy/test/compose.test.yaml.

This folder is collected only when named on the command line (``pytest tests/deploy``): it needs root,
installs nothing itself (the Makefile target does) and takes 6–17 minutes on 2 cores, so `make test`, which
collects ``tests/``, leaves it out. Run it with ``-s`` to see its phases as they happen.

Environment:
  GD2PO_DEPLOY_KEEP_CACHE=0  remove the engine's data root (images, build cache) at the end; by default
                             it stays in .cache/deploy-test/docker (~6 GB), so the next run rebuilds only
                             what changed (1–2 min after a source change). Containers, volumes and
                             networks never stay.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from compose_stack import (
    CACHE,
    KEEP_CACHE,
    PUBLISHED_PORTS,
    REPO_ROOT,
    STATE,
    TOTAL_STEPS,
    Stack,
    Timeline,
)
from docker_engine import DockerEngine

HERE = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Skip collecting this folder unless the command line names it (or something inside it)."""
    named = [Path(arg.split("::")[0]).resolve() for arg in config.args]
    if any(path == HERE or HERE in path.parents for path in named):
        return None
    return True


@pytest.fixture(scope="session")
def run_dir() -> Path:
    """runs/test-deploy-<time>/: the engine's and the build's logs, the compose logs and timings.json."""
    path = REPO_ROOT / "runs" / time.strftime("test-deploy-%Y%m%d-%H%M%S")
    path.mkdir(parents=True)
    return path


@pytest.fixture(scope="session")
def timeline(run_dir: Path) -> Iterator[Timeline]:
    timeline = Timeline(run_dir)
    timeline.note(f"run folder {run_dir.relative_to(REPO_ROOT)}")
    yield timeline
    timeline.note(f"timings: {json.dumps(timeline.timings)}")


def note_free_disk(timeline: Timeline, when: str) -> None:
    """Record the free space where the engine keeps its data (a cold build took 6.1 GB there; a CI run
    once failed with "no space left on device" mid-build, and this says how close a run came)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    free = round(shutil.disk_usage(CACHE).free / 1e9, 1)
    timeline.timings[f"free disk {when} (GB)"] = free
    timeline.note(f"free disk at {CACHE} {when}: {free} GB")


@pytest.fixture(scope="session")
def engine(run_dir: Path, timeline: Timeline) -> Iterator[DockerEngine]:
    if os.geteuid() != 0:
        pytest.fail("the deploy test starts dockerd and must run as root", pytrace=False)
    note_free_disk(timeline, "before the images")
    engine = DockerEngine(data_root=CACHE / "docker", state=STATE, log_path=run_dir / "dockerd.log")
    leftover = engine.stop_leftover()
    if leftover:
        timeline.note(f"stopped dockerd PID {leftover}, left running by an interrupted run of this test")
    with timeline.phase("engine start"):
        engine.start()
    timeline.note(f"dockerd PID {engine.pid}, data root {engine.data_root}")
    yield engine
    if engine.pid is not None:  # a test failed before the last one stopped it
        problems = engine.stop(remove_data=not KEEP_CACHE)
        timeline.note(f"dockerd stopped by the fixture; problems: {problems or 'none'}")


@pytest.fixture(scope="session")
def images(engine: DockerEngine, run_dir: Path, timeline: Timeline) -> None:
    """deploy/test/build-images.sh, its output shown live and kept in build-images.log."""
    env = {
        **engine.env,
        "PYTHON": sys.executable,
        "GD2PO_DEPLOY_CACHE": str(CACHE),
        "GD2PO_DEPLOY_TIMINGS": str(run_dir / "image-timings.txt"),
        "GD2PO_DEPLOY_BUILD_LOG": str(run_dir / "build-gd2po-cpu.log"),
    }
    script = REPO_ROOT / "deploy" / "test" / "build-images.sh"
    with timeline.phase("images"), (run_dir / "build-images.log").open("w") as log:
        process = subprocess.Popen(
            [str(script)], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines = []
        for line in process.stdout:
            print(line, end="", flush=True)
            log.write(line)
            lines.append(line)
        if process.wait() != 0:
            pytest.fail(
                f"{script.name} failed ({process.returncode}):\n{''.join(lines[-30:])}", pytrace=False
            )
    for line in (run_dir / "image-timings.txt").read_text().splitlines():
        name, seconds = line.rsplit(" ", 1)
        if not name.startswith("image-size"):
            timeline.timings[f"images: {name}"] = float(seconds)
        else:
            timeline.timings["gd2po:cpu size (GB)"] = round(int(seconds) / 1e9, 2)
    note_free_disk(timeline, "after the images")


def _prometheus_config(run_dir: Path) -> Path:
    """The shipped prometheus.yml with 5 s scrape and evaluation intervals (everything else as shipped)."""
    config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="5s", evaluation_interval="5s", scrape_timeout="4s")
    path = run_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o644)  # Prometheus runs as nobody
    return path


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@pytest.fixture(scope="session")
def stack(
    engine: DockerEngine,
    images: None,
    run_dir: Path,
    timeline: Timeline,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """`docker compose --profile cpu up -d` of docker-compose.yml + deploy/test/compose.test.yaml, with
    secrets generated for this run (in a private temp folder, never in the tree)."""
    values = {name: secrets.token_hex(24) for name in ("REDIS_PASSWORD", "GD2PO_API_TOKEN")}
    # Compose interpolates the whole file, so Grafana's password is required although Grafana (profile
    # monitoring-ui) does not run.
    values["GRAFANA_ADMIN_PASSWORD"] = secrets.token_hex(24)
    env_file = tmp_path_factory.mktemp("compose-env") / "test.env"
    knobs = {
        "TOTAL_STEPS": str(TOTAL_STEPS),
        "GD2PO_TEST_PROMETHEUS_CONFIG": str(_prometheus_config(run_dir)),
    }
    env_file.write_text("".join(f"{k}={v}\n" for k, v in {**values, **knobs}.items()))
    env_file.chmod(0o600)
    stack = Stack(engine=engine, env_file=env_file, secrets=values, run_dir=run_dir)
    stack.compose("down", "--volumes", "--remove-orphans")  # what an interrupted run left in the data root
    for what, port in PUBLISHED_PORTS.items():
        if _port_in_use(port):
            pytest.fail(
                f"127.0.0.1:{port} is in use; docker-compose.yml publishes the {what} there", pytrace=False
            )
    stack.started = time.monotonic()
    with timeline.phase("compose up -d (until the rollout's dependencies are healthy)"):
        # No build (build-images.sh built gd2po:cpu from the same Dockerfile and context) and no pull
        # (the images are local; a missing one must fail here, not time out on a registry).
        stack.compose("up", "--detach", "--no-build", "--pull", "never", timeout=900)
    yield stack
    if not stack.down_done and engine.pid is not None:
        stack.down()
    timeline.note(f"compose logs in {(run_dir / 'compose.log').relative_to(REPO_ROOT)}")
