"""docker-compose.yml validates with the real Compose v2 binary, needs its secrets, and swaps a reward
endpoint with one variable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from deploy_refs import scrape_targets
from deploy_tools import DEPLOY, REPO_ROOT, compose_binary, run

from proto.config import load_config

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
COMPOSE_CONFIG = REPO_ROOT / "configs" / "tool_calling_compose.yaml"
SECRETS = {"REDIS_PASSWORD": "r" * 32, "GD2PO_API_TOKEN": "t" * 32, "GRAFANA_ADMIN_PASSWORD": "g" * 16}
GD2PO_VARS = (
    "REDIS_URL",
    "CORRECTNESS_URL",
    "FORMAT_URL",
    "LENGTH_URL",
    "MODEL_PATH",
    "TRAIN_FILE",
    "TOTAL_STEPS",
    "WEIGHTS_TRANSPORT",
)


def compose(tmp_path: Path, *args: str, env: dict[str, str] | None = None):
    """The compose binary on an empty env file, so the developer's own .env never leaks in."""
    env_file = tmp_path / "test.env"
    env_file.write_text("")
    clean = {k: v for k, v in os.environ.items() if k not in {*SECRETS, *GD2PO_VARS, "COMPOSE_PROFILES"}}
    command = [compose_binary(), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args]
    return run(command, env={**clean, **(env or {})}, cwd=REPO_ROOT)


def rendered(tmp_path: Path, profile: str, **env: str) -> dict:
    result = compose(tmp_path, "--profile", profile, "config", "--format", "json", env={**SECRETS, **env})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_config_is_valid(tmp_path: Path, profile: str) -> None:
    result = compose(tmp_path, "--profile", profile, "config", "-q", env=SECRETS)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_a_missing_secret_refuses_to_start(tmp_path: Path, secret: str) -> None:
    others = {name: value for name, value in SECRETS.items() if name != secret}
    result = compose(tmp_path, "--profile", "cpu", "config", "-q", env=others)
    assert result.returncode != 0 and secret in result.stderr


def test_profiles_pick_gpu_or_cpu_services(tmp_path: Path) -> None:
    gpu, cpu = rendered(tmp_path, "gpu")["services"], rendered(tmp_path, "cpu")["services"]
    common = {"redis", "prometheus", "reward-format", "reward-length"}
    common |= {"reward-correctness", "reward-correctness-2"}  # the scaled reward: two replicas
    assert set(gpu) == common | {"rollout", "trainer"}
    assert set(cpu) == common | {"rollout-cpu", "trainer-cpu"}
    # Grafana only with its own profile: `--profile cpu up` runs the stack without pulling it.
    assert set(rendered(tmp_path, "monitoring-ui")["services"]) == common | {"grafana"}
    devices = gpu["rollout"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "deploy" not in cpu["rollout-cpu"] and cpu["rollout-cpu"]["image"] == "gd2po:cpu"
    # CPU services answer to the GPU services' names, so the Prometheus targets are the same.
    assert cpu["rollout-cpu"]["networks"]["default"]["aliases"] == ["rollout"]
    assert cpu["trainer-cpu"]["networks"]["default"]["aliases"] == ["trainer"]


def test_redis_has_aof_a_volume_and_a_password(tmp_path: Path) -> None:
    redis = rendered(tmp_path, "cpu")["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--requirepass" in command
    assert SECRETS["REDIS_PASSWORD"] not in command  # only in the environment, never the command
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])


def test_swapping_a_reward_endpoint_is_one_variable(tmp_path: Path, monkeypatch) -> None:
    services = rendered(tmp_path, "cpu", FORMAT_URL="http://my-format:9000")["services"]
    environment = services["rollout-cpu"]["environment"]
    assert environment["FORMAT_URL"] == "http://my-format:9000"
    assert environment["CORRECTNESS_URL"] is None  # unset: the config's default applies
    for name, value in environment.items():
        if value is not None:
            monkeypatch.setenv(name, value)
    urls = {r.name: r.urls for r in load_config(COMPOSE_CONFIG).rewards}
    assert urls == {
        "correctness": ["http://reward-correctness:8000", "http://reward-correctness-2:8000"],
        "format": ["http://my-format:9000"],
        "length": ["http://reward-length:8000"],
    }


def test_broadcast_weights_are_one_variable(tmp_path: Path, monkeypatch) -> None:
    """WEIGHTS_TRANSPORT=broadcast reaches the trainer and switches its transport; the trainer's store binds
    every interface and is offered under the DNS name both the GPU and the CPU trainer answer to."""
    services = rendered(tmp_path, "cpu", WEIGHTS_TRANSPORT="broadcast")["services"]
    assert "trainer" in services["trainer-cpu"]["networks"]["default"]["aliases"]
    for name, value in services["trainer-cpu"]["environment"].items():
        if value is not None:
            monkeypatch.setenv(name, value)
    publish = load_config(COMPOSE_CONFIG).trainer.publish
    assert (publish.transport, publish.broadcast.host, publish.broadcast.advertise) == (
        "broadcast", "0.0.0.0", "trainer",
    )  # fmt: skip
    monkeypatch.delenv("WEIGHTS_TRANSPORT")
    assert load_config(COMPOSE_CONFIG).trainer.publish.transport == "disk"  # unset: folders, as before


def test_prometheus_scrapes_every_gd2po_service(tmp_path: Path) -> None:
    services = rendered(tmp_path, "gpu")["services"]
    targets = set().union(*scrape_targets(DEPLOY / "prometheus" / "prometheus.yml").values())
    gd2po = {name for name, s in services.items() if s["image"].startswith("gd2po:")}
    assert {f"{name}:8000" for name in gd2po} <= targets


def test_grafana_is_provisioned_with_the_dashboard(tmp_path: Path) -> None:
    grafana = rendered(tmp_path, "monitoring-ui")["services"]["grafana"]
    mounts = {v["source"]: v["target"] for v in grafana["volumes"] if v["type"] == "bind"}
    assert mounts[str(DEPLOY / "grafana" / "provisioning")] == "/etc/grafana/provisioning"
    assert mounts[str(DEPLOY / "grafana" / "dashboards")] == "/etc/grafana/dashboards"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/gd2po.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"


def test_env_example_documents_every_required_variable() -> None:
    example = (REPO_ROOT / ".env.example").read_text()
    for name in (*SECRETS, "COMPOSE_PROFILES", *GD2PO_VARS):
        assert f"{name}=" in example, name
    assert ".env" in (REPO_ROOT / ".gitignore").read_text().splitlines()
