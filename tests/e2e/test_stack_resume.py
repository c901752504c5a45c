"""`gd2po up --resume`: a run stopped with Ctrl-C continues from its own folder — the private Redis comes
back from its append-only file, the trainer from its newest checkpoint, the rollout from its saved prompt
position and the last announced policy — and ends with every step done once and every group trained once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis
import yaml
from stack_helpers import finish, start_gd2po_up, steps_logged, tiny_stack_config

from gd2po.redis_server import RedisProcess
from gd2po.runlog import read_steps
from proto import ScoredGroup, decode
from proto.keys import RedisKeys
from proto.stream import entry_message

pytestmark = pytest.mark.e2e
# Many more steps than the stop point: a warm tiny stack trains ~5 steps a second, so with 6 steps the
# first run could finish before the SIGINT arrived and the test measured nothing (seen when run after the
# other e2e tests). 40 steps leave the first run seconds of margin whatever the machine's speed.
STEPS = 40
STOP_AT = 2


def stop_after(process, run_dir: Path, steps: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while steps_logged(run_dir) < steps:
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "the run never reached the step to stop at"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 130 and "every service was stopped" in output, output


def test_a_stopped_run_resumes_where_it_left_off(tmp_path: Path, tiny_model_dir: Path) -> None:
    config_path = tiny_stack_config(tmp_path, tiny_model_dir, steps=STEPS)
    config = yaml.safe_load(config_path.read_text())
    config["trainer"]["checkpoint"]["every"] = 1
    config_path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    assert not os.environ.get("GD2PO_REDIS__URL") and not os.environ.get("REDIS_URL")  # the private Redis

    first = start_gd2po_up(config_path, run_dir, {})
    stop_after(first, run_dir, STOP_AT)
    stopped_at = steps_logged(run_dir)
    assert stopped_at < STEPS // 2, f"the first run went on to step {stopped_at} before it stopped"

    second = start_gd2po_up(config_path, run_dir, {}, extra=("--resume",))
    output = finish(second, 600)
    assert second.returncode == 0, output

    steps = read_steps(run_dir)
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))  # none lost, none redone
    trained = [g for s in steps for g in s["group_ids"]]
    assert len(trained) == len(set(trained)) == STEPS * 2

    # The ledger and the stream came back from the append-only file.
    with RedisProcess(run_dir / "redis", appendonly=True) as redis_server:
        client = redis.Redis.from_url(redis_server.url)
        keys = RedisKeys()
        assert client.smembers(keys.trained) == {g.encode() for g in trained}
        groups = [decode(entry_message(fields), ScoredGroup) for _, fields in client.xrange(keys.groups)]
    sessions = list(dict.fromkeys(g.group_id.rsplit("-", 2)[0] for g in groups))
    assert len(sessions) == 2, sessions  # one rollout process before the stop, one after
    before, after = ([g for g in groups if g.group_id.startswith(s + "-")] for s in sessions)
    # The resumed rollout continued the prompt order and served the trained policy, not the initial one.
    assert not {g.prompt_id for g in after[:2]} & {g.prompt_id for g in before[:2]}
    assert min(g.policy_version for g in after) >= stopped_at
