"""Secrets come only from the environment and never reach the run folder or a log: a secret in a config
file is a config error naming the environment variable to use; a password inside a URL is masked in
config.yaml, services.json and start-up errors; wire versions stay within int64."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from gd2po.ports import free_port
from gd2po.stack import Stack
from proto import PolicyAnnouncement
from proto.config import ConfigError, RedisConfig, dump_config, load_config
from proto.startup import StartupError, wait_for_redis

PASSWORD = "hunter2-secret"
URL = f"redis://gd2po:{PASSWORD}@redis.internal:6379/0"


@pytest.mark.parametrize(
    ("yaml_text", "key", "variable"),
    [
        ("auth: {token: abc}\n", "auth.token", "GD2PO_AUTH__TOKEN"),
        ("redis: {password: abc}\n", "redis.password", "GD2PO_REDIS__PASSWORD"),
    ],
)
def test_a_secret_in_a_config_file_is_refused_naming_the_variable(
    tmp_path: Path, yaml_text: str, key: str, variable: str
) -> None:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=rf"{key}.*{variable}"):
        load_config(path)


def test_the_environment_still_supplies_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "experiment.yaml"
    path.write_text("run: {name: x}\n")
    monkeypatch.setenv("GD2PO_AUTH__TOKEN", "from-env")
    assert load_config(path).auth.token.get_secret_value() == "from-env"


def test_the_run_folder_config_masks_a_url_password_and_loads_back(tmp_path: Path) -> None:
    config = load_config(redis={"url": URL}, rewards=[{"name": "r", "url": "http://u:pw@scorer:9000"}])
    text = dump_config(config)
    assert PASSWORD not in text and ":pw@" not in text
    assert "redis://gd2po:***@redis.internal:6379/0" in text
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert load_config(path).redis.url == "redis://gd2po:***@redis.internal:6379/0"


def test_services_json_masks_the_redis_password(tmp_path: Path) -> None:
    stack = Stack(config=load_config(), run_dir=tmp_path, repo_root=tmp_path, config_path=tmp_path / "x.yaml")
    stack.redis_url = URL
    stack._write_manifest()
    manifest = json.loads((tmp_path / "services.json").read_text())
    assert PASSWORD not in json.dumps(manifest)
    assert manifest["redis_url"] == "redis://gd2po:***@redis.internal:6379/0"


def test_the_start_up_error_for_redis_is_one_masked_line_naming_the_setting() -> None:
    url = f"redis://gd2po:{PASSWORD}@127.0.0.1:{free_port()}/0"
    with pytest.raises(StartupError) as error:
        wait_for_redis(RedisConfig(url=url), timeout=0.3)
    message = str(error.value)
    assert "\n" not in message and PASSWORD not in message
    assert "redis://gd2po:***@127.0.0.1" in message
    assert "redis.url" in message and "GD2PO_REDIS__URL" in message


def test_policy_versions_beyond_int64_are_refused_on_the_wire() -> None:
    with pytest.raises(ValidationError, match="less than or equal to 9223372036854775807"):
        PolicyAnnouncement(version=2**63, path="/w", digest="blake3:" + "0" * 64, step=1, created_at=0.0)
