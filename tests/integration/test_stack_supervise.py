"""Stack.supervise() on real processes that crash on purpose (short Python children and a real Redis),
seconds each: restarts after the backoff with the same command — the trainer with ``--resume`` —,
the budget, and what is not a crash. The whole stack under kill -9 is tests/integration/
test_stack_restart.py."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from gd2po.processes import Child
from gd2po.redis_server import RedisProcess
from gd2po.restart import RestartPolicy
from gd2po.stack import Service, Stack, StackError
from proto.config import load_config
from proto.restarts import read_restarts, start_log

pytestmark = pytest.mark.integration
FAST = RestartPolicy(max_restarts=2, initial_s=0.05, max_s=0.1)
CRASH = "import sys; print('{name} is going down'); sys.exit(3)"


def stack_of(tmp_path: Path, policy: RestartPolicy = FAST) -> Stack:
    stack = Stack(
        config=load_config(),
        run_dir=tmp_path,
        repo_root=tmp_path,
        config_path=tmp_path / "x.yaml",
        restart=policy,
    )
    start_log(tmp_path)
    return stack


def add(stack: Stack, name: str, code: str, *args: str, replica_of: str | None = None) -> Service:
    child = Child(
        name=name,
        command=[sys.executable, "-c", code.format(name=name), *args],
        log_path=stack.run_dir / "logs" / f"{name}.log",
        env={"MASTER_PORT": "1"},
    ).start(cwd=stack.run_dir)
    service = Service(child, replica_of=replica_of)
    stack.services.append(service)
    return service


def supervise_until(stack: Stack, done: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "supervision never got there"
        stack.supervise()
        time.sleep(0.02)


def test_a_child_that_keeps_crashing_is_restarted_until_its_budget_is_spent(tmp_path: Path) -> None:
    stack = stack_of(tmp_path)
    service = add(stack, "rollout", CRASH)
    first_pid = service.child.pid
    with pytest.raises(StackError) as error:
        supervise_until(stack, lambda: False)
    message = str(error.value)
    assert message.startswith("rollout exited with code 3 after 2 restart(s) of 2; last lines of")
    assert message.count("rollout is going down") == 3  # the log tail: every start, in one log
    assert "--- gd2po up: rollout exited with code 3; restart 2 of 2 in 0.1 s ---" in message
    restarts = read_restarts(tmp_path) or []
    assert [(r.child, r.exit_code, r.attempt, r.delay_s) for r in restarts] == [
        ("rollout", 3, 1, 0.05),
        ("rollout", 3, 2, 0.1),
    ]
    assert service.child.pid != first_pid
    manifest = json.loads((tmp_path / "services.json").read_text())  # rewritten with the new pid
    assert [s["pid"] for s in manifest["services"]] == [service.child.pid]


def test_the_trainer_restarts_with_resume_and_its_exit_0_ends_the_run(tmp_path: Path) -> None:
    stack = stack_of(tmp_path)
    # Crashes unless started with --resume; then trains "to the end" (exit 0).
    code = "import sys; sys.exit(0 if '--resume' in sys.argv else 1)"
    trainer = add(stack, "trainer", code)
    supervise_until(stack, stack.trainer_done)
    assert trainer.child.command[-1] == "--resume"
    assert trainer.child.env["MASTER_PORT"] != "1"  # a fresh rendezvous port
    assert [r.child for r in read_restarts(tmp_path) or []] == ["trainer"]
    stack.supervise()  # finished, not crashed: no restart
    assert len(read_restarts(tmp_path) or []) == 1


def test_another_child_exiting_0_is_no_crash_and_still_stops_the_run(tmp_path: Path) -> None:
    stack = stack_of(tmp_path)
    add(stack, "rollout", "pass")
    with pytest.raises(StackError, match="^rollout exited with code 0; last lines"):
        supervise_until(stack, lambda: False)
    assert read_restarts(tmp_path) == []


def test_a_trainer_that_finished_before_it_was_seen_ready_does_not_hold_up_the_start(tmp_path: Path) -> None:
    """Under load a short run can train every step and exit 0 between two readiness polls; the start then
    goes on (to the run's end) instead of polling the finished trainer's /readyz until the timeout."""
    stack = stack_of(tmp_path)
    trainer = add(stack, "trainer", "print('{name} done')")
    trainer.ready_url = "http://127.0.0.1:9/readyz"  # nothing listens: it was only up while training
    deadline = time.monotonic() + 10
    while trainer.child.exit_code() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started = time.monotonic()
    stack.wait_ready(timeout=30)
    assert time.monotonic() - started < 5
    assert stack.trainer_done()
    stack.stop()


def test_restart_no_stops_at_the_first_crash(tmp_path: Path) -> None:
    stack = stack_of(tmp_path, RestartPolicy(max_restarts=0))
    add(stack, "reward-format-0", CRASH)
    with pytest.raises(StackError, match="^reward-format-0 exited with code 3; last lines"):
        supervise_until(stack, lambda: False)
    assert read_restarts(tmp_path) == []


def test_a_replica_out_of_restarts_drops_out_while_another_serves(tmp_path: Path) -> None:
    stack = stack_of(tmp_path)
    add(stack, "reward-format-0", "import time; time.sleep(60)", replica_of="format")
    crashing = add(stack, "reward-format-1", CRASH, replica_of="format")
    supervise_until(stack, lambda: crashing in stack.lost)
    stack.supervise()  # no error: the other replica serves
    assert len(read_restarts(tmp_path) or []) == 2
    stack.stop()


def test_redis_killed_comes_back_on_its_port_with_every_acknowledged_write(tmp_path: Path) -> None:
    stack = stack_of(tmp_path)
    stack.redis = RedisProcess(tmp_path / "redis", appendonly=True, appendfsync="always").start()
    url = stack.redis.url
    client = redis.Redis.from_url(url)
    for i in range(100):
        client.xadd("groups", {"i": i})
    os.kill(stack.redis.process.pid, signal.SIGKILL)  # no time to flush anything
    supervise_until(
        stack, lambda: stack.redis_watch.history.restarts == 1 and stack.redis.exit_code() is None
    )
    try:
        assert stack.redis.url == url
        assert client.xlen("groups") == 100  # the client reconnects; AOF `always` lost nothing
        assert json.loads((tmp_path / "services.json").read_text())["redis"]["pid"] == stack.redis.process.pid
        assert [r.child for r in read_restarts(tmp_path) or []] == ["redis"]
    finally:
        client.close()
        stack.stop()
