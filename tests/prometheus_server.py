"""A real Prometheus server for the end-to-end tests: the shipped rule files, file-based service discovery
for a run's services, queried over its HTTP API. Started and stopped by PID like the tests' Redis.

Debian's ``prometheus`` package (the Makefile's ``system`` target) provides the binary; a missing binary is
a broken setup, so the fixture fails instead of skipping.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
import yaml

from gd2po.ports import free_port
from gd2po.processes import Child

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
# The compose scrape config's job names (deploy/prometheus/prometheus.yml), so the rules and dashboard see
# the same `job` labels as in a deployment.
JOBS = ("gd2po-trainer", "gd2po-rollout", "gd2po-reward")


def job_of(service_name: str) -> str:
    """`gd2po up` service name (trainer, rollout, reward-<name>-<i>) → the compose scrape job."""
    return "gd2po-reward" if service_name.startswith("reward-") else f"gd2po-{service_name}"


class PrometheusServer:
    """``prometheus`` on 127.0.0.1 scraping every ``interval`` what :meth:`set_targets` lists."""

    def __init__(self, workdir: Path, interval: str = "1s") -> None:
        self.workdir = workdir
        self.interval = interval
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.child: Child | None = None

    def __enter__(self) -> PrometheusServer:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail(
                "prometheus is not installed: run `make setup` (apt package `prometheus`)", pytrace=False
            )
        (self.workdir / "targets").mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval},
            "rule_files": [str(path) for path in RULE_FILES],
            "scrape_configs": [
                {
                    "job_name": job,
                    "scrape_timeout": self.interval,
                    # Picked up by inotify as soon as set_targets writes it: the run's ports are known
                    # only once `gd2po up` has started its services.
                    "file_sd_configs": [{"files": [str(self.workdir / "targets" / f"{job}.json")]}],
                }
                for job in JOBS
            ],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.child = Child(
            name="prometheus",
            command=[
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            log_path=self.workdir / "prometheus.log",
        ).start(cwd=self.workdir)
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.child.exit_code() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise AssertionError(f"prometheus did not start:\n{self.child.log_tail()}")
            time.sleep(0.2)
        return self

    def __exit__(self, *_exc) -> None:
        if self.child is not None:
            self.child.stop()

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def set_targets(self, services: list[dict]) -> None:
        """Scrape every service of a `gd2po up` manifest (``services.json``) that serves HTTP."""
        by_job: dict[str, list[str]] = {job: [] for job in JOBS}
        for service in services:
            if service["url"]:
                by_job[job_of(service["name"])].append(service["url"].removeprefix("http://"))
        for job, targets in by_job.items():
            staged = self.workdir / "targets" / f"{job}.json.tmp"
            staged.write_text(json.dumps([{"targets": targets}]))
            staged.replace(self.workdir / "targets" / f"{job}.json")  # atomic: never a half-written file

    def api(self, path: str, **params) -> dict | list:
        """``data`` of a Prometheus API answer; an error status fails with Prometheus's own message."""
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert body.get("status") == "success", (
            f"{path} {params}: {body.get('errorType')}: {body.get('error')}"
        )
        return body["data"]

    def query(self, expr: str, at: float) -> list[dict]:
        """Instant query at unix time ``at``; the vector (or the scalar as one sample)."""
        data = self.api("query", query=expr, time=f"{at:.3f}")
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]
