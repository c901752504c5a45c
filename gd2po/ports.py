"""Loopback ports for the processes gd2po starts (Redis, reward services, rollout, trainer metrics).

They are picked below the kernel's ephemeral range: whatever a library binds with port 0 in the meantime
(gloo stores, vLLM, HTTP clients) comes from that range, so it cannot take a port handed out here before
the child binds it — the race that once failed a rollout with "address already in use". A port is
handed out at most once per process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_SPAN = 15_000
_handed_out: set[int] = set()


def _below_ephemeral() -> range:
    try:
        low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux default
    return range(max(1024, low - _SPAN), low)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port below the ephemeral range that was free a moment ago and not handed out before."""
    ports = _below_ephemeral()
    for port in random.SystemRandom().sample(ports, k=min(256, len(ports))):
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {ports.start}-{ports.stop - 1} on {host}")
