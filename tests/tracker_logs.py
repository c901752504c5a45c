"""Reading back what the experiment trackers wrote, each with its own library's reader: TensorBoard's
EventAccumulator, W&B's transaction-log reader (``wandb leet inspect --json``), MlflowClient."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


def tensorboard_events(run_dir: Path):
    """The run's TensorBoard events, every one kept (no sampling)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def tensorboard_texts(events, tag: str) -> list[tuple[int, str]]:
    """(step, text) of each ``add_text(tag, …)``."""
    from tensorboard.util.tensor_util import make_ndarray

    return [
        (e.step, make_ndarray(e.tensor_proto).item().decode()) for e in events.Tensors(f"{tag}/text_summary")
    ]


def wandb_offline_run(run_dir: Path) -> Path:
    """The one offline W&B run folder under the run folder."""
    [folder] = (run_dir / "wandb").glob("offline-run-*")
    return folder


def wandb_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of the offline W&B run, as W&B's own reader prints them (what `wandb sync` uploads)."""
    [log] = wandb_offline_run(run_dir).glob("run-*.wandb")
    inspect = subprocess.run(
        [str(Path(sys.executable).with_name("wandb")), "leet", "inspect", "--json", str(log)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert inspect.returncode == 0, inspect.stderr
    return [json.loads(line) for line in inspect.stdout.splitlines()]


def wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    return [r["history"]["item"] for r in wandb_records(run_dir) if r["type"] == "history"]


def mlflow_client(run_dir: Path):
    """A client of the run folder's default MLflow file store."""
    import os

    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # as the trainer's tracker opens it
    return MlflowClient((run_dir / "mlruns").resolve().as_uri())


def tracker_run_ids(run_dir: Path) -> dict[str, str]:
    return json.loads((run_dir / "trackers.json").read_text())


NO_NETWORK = "the network is off in this test"
DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, every connection is refused


def cut_off_the_network(monkeypatch) -> None:
    """What "works without network" is tested under: in this process a connection to anything but the
    loopback raises; child processes (the trainer, W&B's service) get a dead proxy for every scheme, so
    a client that honours proxies (requests, httpx, urllib, Go's net/http) fails instead of reaching out.
    Loopback stays open: Redis, the reward services and W&B's own service socket live there."""
    loopback = "127.0.0.1,localhost,::1"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, DEAD_PROXY)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, loopback)
    connect = socket.socket.connect

    def loopback_only(sock: socket.socket, address) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            try:
                local = ipaddress.ip_address(host).is_loopback
            except ValueError:
                local = host == "localhost"
            if not local:
                raise OSError(f"{NO_NETWORK}: connect to {host}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
