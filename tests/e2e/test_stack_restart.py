"""`gd2po up --restart on-failure` (the default) on the real stack: kill -9 a reward service, the rollout,
the private Redis and the trainer, one after the other, while it trains. Each comes back (the trainer
with --resume, Redis from its append-only file) and the run still reaches total_steps with every step
logged once, every group trained once and every restart counted in metrics.jsonl. `--restart no` keeps
the old behaviour (the first crash stops the run) and a child out of restarts stops it with its log
tail."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from stack_helpers import finish, start_gd2po_up, steps_logged, tiny_stack_config

from gd2po.processes import pid_alive
from gd2po.redis_server import RedisProcess
from gd2po.runlog import read_steps
from proto.keys import RedisKeys
from proto.restarts import read_restarts

pytestmark = pytest.mark.e2e
# Far more steps than the faults need: a warm tiny stack trains a few steps a second, and each fault is
# followed by two steps trained after the victim came back, so the run must not end before the last one.
STEPS = 80
VICTIMS = ("reward-correctness-0", "rollout", "redis", "trainer")


def config_for(tmp_path: Path, model_dir: Path, steps: int = STEPS) -> Path:
    path = tiny_stack_config(tmp_path, model_dir, steps=steps)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["checkpoint"]["every"] = 1
    # Scoring requests outlast a reward service's restart (about 10 s under load) instead of
    # dead-lettering the groups of that moment: the test counts restarts, not dead letters.
    config["rollout"]["retry"] = {"attempts": 12, "backoff_max": 2.0}
    path.write_text(yaml.safe_dump(config))
    return path


def wait_until(process: subprocess.Popen, done: Callable[[], bool], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if process.poll() is not None:
            raise AssertionError(
                f"gd2po up ended while waiting for {what}:\n{process.communicate()[0][-4000:]}"
            )
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def current(run_dir: Path) -> dict[str, dict]:
    """name → services.json entry (pid, url), Redis included, as the stack last wrote it."""
    manifest = json.loads((run_dir / "services.json").read_text())
    entries = {s["name"]: s for s in manifest["services"]}
    if manifest["redis"]:
        entries["redis"] = {**manifest["redis"], "url": None}
    return entries


def restarts_of(run_dir: Path, name: str) -> int:
    return sum(r.child == name for r in read_restarts(run_dir) or [])


def serving(entry: dict) -> bool:
    """The process answers: /readyz of an HTTP service; for Redis, a pid that is alive (the stack
    starts Redis and waits for its PING before it lists the pid)."""
    if entry["url"] is None:
        return pid_alive(entry["pid"])
    try:
        return httpx.get(f"{entry['url']}/readyz", timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False


def kill_trainer_between_steps(run_dir: Path, pid: int) -> int:
    """SIGKILL the trainer at a moment its last logged step is also its newest checkpoint, and return
    that step. Stopped (SIGSTOP) while the run folder is read, so the two cannot move apart: killed
    between logging step N and saving checkpoint N it would redo step N on --resume and log it twice,
    which the trainer's exactly-once contract allows (tests/integration/test_trainer_crash.py) but
    would make "every step logged once" depend on the moment of the kill."""
    latest = run_dir / "checkpoints" / "latest"
    for _ in range(200):
        os.killpg(pid, signal.SIGSTOP)
        logged = steps_logged(run_dir)
        if latest.is_file() and latest.read_text().strip() == f"step-{logged}":
            os.killpg(pid, signal.SIGKILL)
            return logged
        os.killpg(pid, signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError("never found the trainer between two steps")


@pytest.mark.timeout(1800)
def test_every_child_killed_mid_run_comes_back_and_nothing_is_lost(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    config = config_for(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "run"
    assert not os.environ.get("GD2PO_REDIS__URL") and not os.environ.get("REDIS_URL")  # the private Redis
    process = start_gd2po_up(config, run_dir, {})
    wait_until(process, lambda: steps_logged(run_dir) >= 2, "the first steps", timeout=600)
    killed: dict[str, int] = {}
    for name in VICTIMS:
        victim = current(run_dir)[name]
        if name == "trainer":
            kill_trainer_between_steps(run_dir, victim["pid"])
        else:
            os.kill(victim["pid"], signal.SIGKILL)  # the process only, as the OOM killer would
        killed[name] = victim["pid"]
        wait_until(
            process,
            lambda name=name, pid=victim["pid"]: (
                restarts_of(run_dir, name) >= 1
                and current(run_dir)[name]["pid"] != pid
                and serving(current(run_dir)[name])
            ),
            f"{name} to come back",
        )
        back_at = steps_logged(run_dir)
        wait_until(
            process, lambda back_at=back_at: steps_logged(run_dir) >= back_at + 2, f"training after {name}"
        )
    output = finish(process, 900)
    assert process.returncode == 0, output

    # Every step once, every group once: in the step records and in the ledger that came back with Redis.
    steps = read_steps(run_dir)
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    trained = [g for s in steps for g in s["group_ids"]]
    assert len(trained) == len(set(trained)) == STEPS * 2
    with RedisProcess(run_dir / "redis", appendonly=True) as redis_server:
        client = redis.Redis.from_url(redis_server.url)
        assert client.smembers(RedisKeys().trained) == {g.encode() for g in trained}
        client.close()

    # Each victim was restarted after its kill -9, and metrics.jsonl counts every restart.
    restarts = read_restarts(run_dir) or []
    first = {name: next(r for r in restarts if r.child == name) for name in VICTIMS}
    assert {name: r.exit_code for name, r in first.items()} == dict.fromkeys(VICTIMS, -9), restarts
    assert all(r.attempt <= r.max_restarts == 5 for r in restarts)
    assert steps[-1]["restarts_total"] == len(restarts), restarts
    assert all(steps[-1][f"restarts/{name}"] >= 1 for name in VICTIMS)
    assert steps[0]["restarts_total"] == 0
    assert "resumed at step" in (run_dir / "logs" / "trainer.log").read_text()
    # The faults cost restarts only where they struck; a cascade (a service failing while Redis was
    # down) is not forbidden, but shown here if it happened.
    print({r.child: r.exit_code for r in restarts})

    # Nothing left behind: neither the killed processes nor the ones that replaced them.
    time.sleep(0.5)
    pids = [*killed.values(), *(entry["pid"] for entry in current(run_dir).values())]
    assert not [pid for pid in pids if pid_alive(pid)]


@pytest.mark.timeout(900)
def test_restart_no_stops_the_run_at_the_first_crash(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = config_for(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "run"
    process = start_gd2po_up(config, run_dir, {}, extra=("--restart", "no"))
    wait_until(process, lambda: steps_logged(run_dir) >= 2, "the first steps", timeout=600)
    victim = current(run_dir)["rollout"]
    os.kill(victim["pid"], signal.SIGKILL)
    output = finish(process, 300)
    assert process.returncode == 1, output
    assert "rollout exited with code -9; last lines of" in output, output
    assert not (run_dir / "restarts.jsonl").exists()
    assert "restarts_total" not in read_steps(run_dir)[-1]
    time.sleep(0.5)
    assert not [e["name"] for e in current(run_dir).values() if pid_alive(e["pid"])]


@pytest.mark.timeout(900)
def test_a_child_out_of_restarts_stops_the_run_with_its_log_tail(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    config = config_for(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "run"
    process = start_gd2po_up(config, run_dir, {}, extra=("--max-restarts", "1"))
    wait_until(process, lambda: steps_logged(run_dir) >= 2, "the first steps", timeout=600)
    name = "reward-correctness-0"
    first = current(run_dir)[name]
    os.kill(first["pid"], signal.SIGKILL)
    wait_until(
        process,
        lambda: current(run_dir)[name]["pid"] != first["pid"] and serving(current(run_dir)[name]),
        f"{name} to come back",
    )
    os.kill(current(run_dir)[name]["pid"], signal.SIGKILL)  # crashes again: no restart left
    output = finish(process, 300)
    assert process.returncode == 1, output
    assert f"{name} exited with code -9 after 1 restart(s) of 1; last lines of" in output, output
    assert f"--- gd2po up: {name} exited with code -9; restart 1 of 1 in 0.5 s ---" in output, output
    assert [(r.child, r.attempt) for r in read_restarts(run_dir) or []] == [(name, 1)]
    time.sleep(0.5)
    assert not [e["name"] for e in current(run_dir).values() if pid_alive(e["pid"])]
