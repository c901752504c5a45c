"""Child processes of the local stack: started in their own process group, logged to a file, stopped
for sure (SIGTERM, then SIGKILL), and told to die with their parent so nothing is left orphaned.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _stat_fields(stat: Path) -> list[str] | None:
    """/proc/<pid>/stat after the command name: state, ppid, pgrp, session, … (None once it is gone)."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """Running: a zombie is not (it has exited and only waits for its parent)."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return fields is not None and fields[0] != "Z"


def processes_in_sessions(sessions: set[int]) -> set[int]:
    """Running processes whose session id is one of ``sessions`` (each child of the stack leads its own
    session, so this finds what a child started: vLLM's engine, DeepSpeed's ranks)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(stat)
        if fields is not None and fields[0] != "Z" and int(fields[3]) in sessions:
            found.add(int(stat.parent.name))
    return found


def _die_with_parent() -> None:
    """Runs in the child before exec: ask the kernel to SIGTERM it when gd2po dies (Linux only)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    os.setsid()


@dataclass
class Child:
    """One service process with its log file."""

    name: str
    command: Sequence[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    def start(self, cwd: Path) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                list(self.command),
                cwd=cwd,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the whole process group, wait, then SIGKILL whatever is left."""
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while self.process.poll() is None or _group_alive(self.process.pid):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            if self.process.poll() is not None and not _group_alive(self.process.pid):
                break


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, or ``(no log)``."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _group_alive(pgid: int) -> bool:
    """True while any process of the group exists (the caller reaps the leader with poll())."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
