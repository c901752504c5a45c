"""A private Docker engine for the deploy test: one `dockerd` started and stopped by its PID.

Debian's `docker.io` (20.10) runs without systemd: `dockerd --data-root D --exec-root E --pidfile P` is
ready in about a second. Everything the engine touches outside its own directories is put back when it
stops, because nothing else on the machine asked for a Docker engine: the iptables rules and the
`docker0` bridge it creates, `net.ipv4.ip_forward` (which it turns on) and `/etc/docker/key.json` (its
20.10 trust key, written on first start).

The data root (images, build cache) may be kept between runs as a cache: it then holds no container,
volume or network of the stack (the test checks that before stopping the engine). The exec root (the
runtime state of containerd and the shims), the socket and the PID file are always removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

# Debian's CLI matches the daemon; a newer `docker` earlier on PATH (e.g. /usr/local/bin, 28.x) refuses
# to talk to a 20.10 daemon.
DOCKER_CLI = os.environ.get("GD2PO_DEPLOY_DOCKER_CLI", "/usr/bin/docker")
DOCKERD = os.environ.get("GD2PO_DEPLOY_DOCKERD", "/usr/sbin/dockerd")
TRUST_KEY = Path("/etc/docker/key.json")
BRIDGE = "docker0"
# What dockerd adds to iptables (the same for the legacy and the nf_tables backends).
BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
}


class EngineError(RuntimeError):
    """The engine could not start or stop; the message names what went wrong and where the log is."""


def pid_alive(pid: int) -> bool:
    """Signalable, zombies included — unlike gd2po.processes.pid_alive, which counts a zombie as gone. The
    stop loop must keep calling waitpid until dockerd is reaped: a Go daemon's leader turns zombie while
    its other threads still exit, and WNOHANG cannot reap it yet (tried: /proc/<pid> was left behind)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


@dataclass
class HostState:
    """What dockerd changes on the host, recorded before it first starts (kept in a file, so a run that
    finds a daemon left over by an interrupted run restores the state from before that run)."""

    iptables: str
    ip_forward: str
    had_bridge: bool
    had_trust_key: bool

    @classmethod
    def capture(cls) -> HostState:
        saved = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
        return cls(
            iptables=saved,
            ip_forward=Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
            had_bridge=Path(f"/sys/class/net/{BRIDGE}").exists(),
            had_trust_key=TRUST_KEY.exists(),
        )

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "iptables.rules").write_text(self.iptables)
        flags = f"ip_forward={self.ip_forward}\nhad_bridge={int(self.had_bridge)}\n"
        flags += f"had_trust_key={int(self.had_trust_key)}\n"
        (folder / "host.state").write_text(flags)

    @classmethod
    def load(cls, folder: Path) -> HostState | None:
        try:
            rules = (folder / "iptables.rules").read_text()
            flags = dict(line.split("=", 1) for line in (folder / "host.state").read_text().split())
        except OSError:
            return None
        return cls(rules, flags["ip_forward"], flags["had_bridge"] == "1", flags["had_trust_key"] == "1")

    def restore(self) -> list[str]:
        """Put the host back; returns what could not be restored (the caller reports it)."""
        problems = []
        # iptables-restore rewrites only the tables present in the snapshot; a table dockerd created
        # from nothing (iptables-save prints no table that has no rule) is emptied by hand.
        for table, chains in BUILTIN_CHAINS.items():
            if f"*{table}\n" in self.iptables:
                continue
            commands = [["-F"], ["-X"], *(["-P", chain, "ACCEPT"] for chain in chains)]
            for args in commands:
                result = subprocess.run(["iptables", "-t", table, *args], capture_output=True, text=True)
                if result.returncode != 0:
                    problems.append(f"iptables -t {table} {' '.join(args)}: {result.stderr.strip()}")
        if self.iptables.strip():
            result = subprocess.run(["iptables-restore"], input=self.iptables, capture_output=True, text=True)
            if result.returncode != 0:
                problems.append(f"iptables-restore: {result.stderr.strip()}")
        Path("/proc/sys/net/ipv4/ip_forward").write_text(self.ip_forward + "\n")
        if not self.had_bridge and Path(f"/sys/class/net/{BRIDGE}").exists():
            result = subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True, text=True)
            if result.returncode != 0:
                problems.append(f"ip link delete {BRIDGE}: {result.stderr.strip()}")
        if not self.had_trust_key:
            TRUST_KEY.unlink(missing_ok=True)
        return problems


@dataclass
class DockerEngine:
    """``dockerd`` with its own data root, exec root, socket and PID file under ``state``."""

    data_root: Path
    state: Path
    log_path: Path
    pid: int | None = None
    _log: object = field(default=None, repr=False)

    @property
    def exec_root(self) -> Path:
        return self.state / "exec"

    @property
    def socket(self) -> Path:
        return self.state / "docker.sock"

    @property
    def pidfile(self) -> Path:
        return self.state / "dockerd.pid"

    @property
    def env(self) -> dict[str, str]:
        """The environment for the docker CLI and compose: this engine only, a private CLI config (no
        credentials or contexts of the user's), BuildKit on (20.10 defaults to the legacy builder)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_", "BUILDX_"))}
        env.update(
            DOCKER_HOST=f"unix://{self.socket}",
            DOCKER_CONFIG=str(self.state / "cli-config"),
            DOCKER_BUILDKIT="1",
        )
        return env

    def docker(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [DOCKER_CLI, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise EngineError(
                f"docker {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result

    def _ours(self, pid: int) -> bool:
        args = cmdline(pid)
        return bool(args) and Path(args[0]).name == "dockerd" and f"--pidfile={self.pidfile}" in args

    def stop_leftover(self) -> int | None:
        """Stop a dockerd an interrupted run of this test left behind (its PID file names it, and its
        command line has this test's PID file). Returns its PID, or None."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        if not (pid_alive(pid) and self._ours(pid)):
            return None
        self._terminate(pid)
        return pid

    def start(self, timeout: float = 60) -> None:
        for tool in (DOCKER_CLI, DOCKERD, "iptables-save", "iptables-restore", "ip"):
            if not shutil.which(tool):
                raise EngineError(f"{tool} is missing: `make test-deploy` installs docker.io with apt-get")
        self.stop_leftover()
        if HostState.load(self.state) is None:  # else: the state from before an interrupted run
            before = HostState.capture()
            if before.had_bridge:
                # Two engines on one bridge fight over its addresses and iptables rules.
                raise EngineError(
                    f"{BRIDGE} exists: another Docker engine runs on this machine; the deploy test starts "
                    "its own and needs Docker's networking to itself (stop the other one first)"
                )
            before.save(self.state)
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.exec_root.mkdir(parents=True, exist_ok=True)
        (self.state / "cli-config").mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        process = subprocess.Popen(
            [
                DOCKERD,
                f"--data-root={self.data_root}",
                f"--exec-root={self.exec_root}",
                f"--pidfile={self.pidfile}",
                f"--host=unix://{self.socket}",
                "--log-level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C of the test reaches the test, which stops the engine
        )
        self.pid = process.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise EngineError(f"dockerd exited with {process.returncode} at start; see {self.log_path}")
            if self.socket.exists() and self.docker("version", check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.2)
        self._terminate(self.pid)
        raise EngineError(
            f"dockerd did not answer on {self.socket} within {timeout:.0f} s; see {self.log_path}"
        )

    def _terminate(self, pid: int, timeout: float = 60) -> None:
        """SIGTERM (dockerd stops its containers and its managed containerd), SIGKILL after ``timeout``."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
            time.sleep(0.1)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)

    def leftover_processes(self) -> list[str]:
        """containerd, shims and containers of this engine still running (their command lines or
        environments name its exec root)."""
        marker = str(self.exec_root)
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                args = cmdline(int(entry.name))
                if any(marker in arg for arg in args):
                    found.append(f"{entry.name}: {' '.join(args)[:200]}")
        return found

    def stop(self, *, remove_data: bool) -> list[str]:
        """Stop dockerd by its PID and remove its runtime state (and its data root if asked). Returns
        the problems found (an empty list: nothing left)."""
        problems = []
        if self.pid is not None:
            self._terminate(self.pid)
            if pid_alive(self.pid):
                problems.append(f"dockerd (PID {self.pid}) still runs after SIGKILL")
        problems += [f"left running: {p}" for p in self.leftover_processes()]
        if self._log is not None:
            self._log.close()
            self._log = None
        # Mounts the engine left (only after a crash: a clean stop unmounts everything) would make
        # rmtree fail or, worse, delete through a bind mount; refuse and name them.
        with open("/proc/self/mounts") as mounts:
            ours = [
                line.split()[1]
                for line in mounts
                if str(self.exec_root) in line or str(self.data_root) in line
            ]
        if ours:
            problems.append(f"mounts left under the engine's folders: {ours}")
        else:
            shutil.rmtree(self.exec_root, ignore_errors=True)
            if remove_data:
                shutil.rmtree(self.data_root, ignore_errors=True)
        self.socket.unlink(missing_ok=True)
        self.pidfile.unlink(missing_ok=True)
        state = HostState.load(self.state)
        if state is not None:
            problems += state.restore()
            (self.state / "iptables.rules").unlink(missing_ok=True)
            (self.state / "host.state").unlink(missing_ok=True)
        shutil.rmtree(self.state / "cli-config", ignore_errors=True)
        for path in (self.exec_root, self.socket, self.pidfile):
            if path.exists():
                problems.append(f"{path} still exists")
        with contextlib.suppress(OSError):
            self.state.rmdir()  # when empty: nothing of the engine is left there
        if remove_data and self.data_root.exists():
            problems.append(f"{self.data_root} still exists")
        self.pid = None
        return problems
