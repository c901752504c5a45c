"""proto.redis_conn against a real password-protected Redis server process."""

from pathlib import Path

import pytest
import redis

from gd2po.redis_server import RedisProcess
from proto.config import RedisConfig
from proto.redis_conn import connect


def test_password_from_settings_is_used(tmp_path: Path) -> None:
    with RedisProcess(tmp_path) as server:
        admin = redis.Redis.from_url(server.url)
        admin.config_set("requirepass", "hunter2")
        admin.close()
        with pytest.raises(redis.AuthenticationError):
            connect(RedisConfig(url=server.url)).ping()
        assert connect(RedisConfig(url=server.url, password="hunter2")).ping()


def test_client_survives_a_server_restart(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path, appendonly=True).start()
    try:
        client = connect(RedisConfig(url=server.url))
        client.set("k", "v")
        server.stop()
        server.start()
        assert client.get("k") == b"v"  # AOF kept it and the client reconnected by itself
    finally:
        server.stop()
