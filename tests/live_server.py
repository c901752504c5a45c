"""Run a real ASGI app under uvicorn on 127.0.0.1 in a background thread, for integration tests."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn

from gd2po.ports import free_port


@contextlib.contextmanager
def serve(app, *, ready_path: str = "/healthz", timeout: float = 60.0) -> Iterator[str]:
    """Yield the base URL once ``ready_path`` answers 200; shut the server down afterwards."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + ready_path, timeout=1.0).status_code == 200:
                break
            if httpx.get(url + "/healthz", timeout=1.0).status_code != 200:
                server.should_exit = True
                raise RuntimeError(f"server on {url} reports a fatal error (see the log)")
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise TimeoutError(f"server on {url} not ready")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
