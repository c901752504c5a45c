"""What the deploy test drives: the compose project on the private engine, /metrics scrapes, the
Prometheus HTTP API, waiting with a clear failure, and the phase timings it prints and keeps."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from deploy_tools import compose_binary
from docker_engine import DockerEngine
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE = REPO_ROOT / ".cache" / "deploy-test"
# Short: the engine's exec root holds unix sockets (108-byte path limit).
STATE = Path(tempfile.gettempdir()) / "gd2po-deploy-test"
KEEP_CACHE = os.environ.get("GD2PO_DEPLOY_KEEP_CACHE", "1") != "0"
COMPOSE_FILES = (REPO_ROOT / "docker-compose.yml", REPO_ROOT / "deploy" / "test" / "compose.test.yaml")
PROJECT = "gd2po"  # docker-compose.yml's `name:`
PUBLISHED_PORTS = {"rollout API": 8200, "Prometheus": 9090}
# Long enough that training never ends inside the test (~10 steps, then a second rollout replica warms
# up and joins); short enough that a stack someone forgot to stop stops training by itself.
TOTAL_STEPS = 60


class Timeline:
    """Prints each phase as it happens (elapsed since the session began) and keeps the durations, which
    are written to timings.json in the run folder."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.started, self.timings = run_dir, time.monotonic(), {}

    def note(self, message: str) -> None:
        elapsed = int(time.monotonic() - self.started)
        print(f"\n[deploy-test {elapsed // 60:02d}:{elapsed % 60:02d}] {message}", flush=True)

    def record(self, name: str, seconds: float) -> None:
        self.timings[name] = round(seconds, 1)
        self.note(f"{name}: {seconds:.1f} s")
        (self.run_dir / "timings.json").write_text(json.dumps(self.timings, indent=2) + "\n")

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.note(f"{name} …")
        started = time.monotonic()
        yield
        self.record(name, time.monotonic() - started)


def wait_until(
    what: str,
    probe: Callable[[], tuple[bool, Any]],
    timeout: float,
    *,
    interval: float = 3.0,
    diagnose: Callable[[], str] = lambda: "",
) -> Any:
    """Poll ``probe`` (→ done, observation) until done; fail naming ``what``, the last observation and
    ``diagnose()`` (e.g. a service's log tail) after ``timeout`` seconds. A probe that raises an HTTP
    or lookup error counts as not done yet."""
    deadline = time.monotonic() + timeout
    observation: Any = None
    while True:
        try:
            done, observation = probe()
        except (httpx.HTTPError, KeyError, IndexError, ValueError, subprocess.SubprocessError) as exc:
            done, observation = False, f"{type(exc).__name__}: {exc}"
        if done:
            return observation
        if time.monotonic() > deadline:
            pytest.fail(
                f"{what}: not within {timeout:.0f} s; last seen: {observation}\n{diagnose()}", pytrace=False
            )
        time.sleep(interval)


@dataclass
class Metrics:
    """One scrape of a /metrics page."""

    samples: list[tuple[str, dict[str, str], float]]

    @classmethod
    def scrape(cls, base_url: str) -> Metrics:
        text = httpx.get(f"{base_url}/metrics", timeout=10).raise_for_status().text
        return cls(
            [
                (sample.name, sample.labels, sample.value)
                for family in text_string_to_metric_families(text)
                for sample in family.samples
            ]
        )

    def value(self, name: str, **labels: str) -> float:
        """The sum over the samples of ``name`` whose labels include ``labels`` (0 when none)."""
        return sum(
            value
            for sample, sample_labels, value in self.samples
            if sample == name and all(sample_labels.get(k) == v for k, v in labels.items())
        )

    def has(self, name: str) -> bool:
        return any(sample == name for sample, _, _ in self.samples)


@dataclass
class Stack:
    """The compose project on the private engine."""

    engine: DockerEngine
    env_file: Path
    secrets: dict[str, str]
    run_dir: Path
    started: float = 0.0  # monotonic time of `compose up`
    down_done: bool = False
    _ips: dict[str, str] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        files = [arg for path in COMPOSE_FILES for arg in ("-f", str(path))]
        # Only what compose needs from this process: the user's exported secrets or GD2PO_* knobs would
        # override the test's env file (the shell wins over --env-file in compose).
        env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}
        env.update({k: v for k, v in self.engine.env.items() if k.startswith("DOCKER_")})
        command = [compose_binary(), *files, "--env-file", str(self.env_file), "--profile", "cpu", *args]
        result = subprocess.run(
            command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"docker compose {' '.join(args)} failed ({result.returncode}):\n{result.stderr}",
                pytrace=False,
            )
        return result

    def replicas(self) -> dict[str, list[dict]]:
        """``docker inspect`` of every container of the project, by compose service name, in container
        number order (``--scale`` runs several containers of one service)."""
        ids = self.compose("ps", "--all", "--quiet").stdout.split()
        if not ids:
            return {}
        inspected = json.loads(self.engine.docker("inspect", *ids).stdout)
        by_service: dict[str, list[dict]] = {}
        for container in sorted(
            inspected, key=lambda c: int(c["Config"]["Labels"]["com.docker.compose.container-number"])
        ):
            by_service.setdefault(container["Config"]["Labels"]["com.docker.compose.service"], []).append(
                container
            )
        return by_service

    def containers(self) -> dict[str, dict]:
        """Each service's first container (container number 1), by compose service name."""
        return {service: replicas[0] for service, replicas in self.replicas().items()}

    def url(self, service: str, replica: int = 0) -> str:
        """http://<container IP>:8000 of a service's container (``replica``: 0-based, in container number
        order) on the project network: the host reaches it over the bridge, so services that publish no
        port can still be scraped as Prometheus does."""
        key = f"{service}#{replica}"
        if key not in self._ips:
            self._ips[key] = container_ip(self.replicas()[service][replica])
        return f"http://{self._ips[key]}:8000"

    def recreated(self, service: str) -> None:
        """Forget the addresses of a service whose containers were recreated (they get new ones)."""
        self._ips = {key: ip for key, ip in self._ips.items() if not key.startswith(f"{service}#")}

    def set_knobs(self, **knobs: str) -> None:
        """Set (or replace) variables of the project's env file; compose reads them at its next call."""
        lines = [
            line for line in self.env_file.read_text().splitlines() if line.split("=", 1)[0] not in knobs
        ]
        self.env_file.write_text(
            "".join(f"{line}\n" for line in [*lines, *(f"{k}={v}" for k, v in knobs.items())])
        )

    def metrics(self, service: str, replica: int = 0) -> Metrics:
        return Metrics.scrape(self.url(service, replica))

    def logs(self, *services: str, tail: int = 40) -> str:
        result = self.compose("logs", "--no-color", "--tail", str(tail), *services, check=False)
        return f"--- docker compose logs --tail {tail} {' '.join(services)} ---\n{result.stdout[-6000:]}"

    def save_logs(self) -> None:
        result = self.compose("logs", "--no-color", "--timestamps", check=False, timeout=120)
        (self.run_dir / "compose.log").write_text(result.stdout + result.stderr)

    def down(self) -> subprocess.CompletedProcess:
        self.save_logs()
        result = self.compose("down", "--volumes", "--remove-orphans", "--timeout", "20")
        self.down_done = True
        return result


def container_ip(container: dict) -> str:
    """A container's address on its (first) network, from ``docker inspect``."""
    networks = container["NetworkSettings"]["Networks"]
    return next(n["IPAddress"] for n in networks.values() if n["IPAddress"])


def prometheus(path: str, **params: str) -> Any:
    """GET the Prometheus HTTP API on its published port; returns ``data``."""
    body = httpx.get(
        f"http://127.0.0.1:{PUBLISHED_PORTS['Prometheus']}{path}", params=params, timeout=10
    ).json()
    if body.get("status") != "success":
        raise ValueError(f"Prometheus {path}: {body}")
    return body["data"]
