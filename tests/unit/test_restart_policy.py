"""`gd2po up --restart on-failure`: the backoff and budget of gd2po.restart, the restart log of
proto.restarts that the trainer counts into metrics.jsonl, and how the progress view shows it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gd2po.progress import RunView, Snapshot, render, restart_line
from gd2po.restart import CrashHistory, RestartMode, RestartPolicy, policy_for
from proto.restarts import RESTARTS_FILE, Restart, append_restart, read_restarts, restart_metrics, start_log


def test_backoff_doubles_from_the_initial_wait_up_to_the_cap() -> None:
    policy = RestartPolicy(initial_s=0.5, factor=2.0, max_s=3.0)
    assert [policy.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert policy.delay(10_000) == 3.0  # no overflow however long the streak
    with pytest.raises(ValueError):
        policy.delay(0)


def test_the_budget_is_per_child_and_the_crash_after_it_is_refused() -> None:
    policy = RestartPolicy(max_restarts=3, initial_s=1.0, factor=2.0, max_s=60.0, stable_after_s=60.0)
    history = CrashHistory()
    assert [policy.on_crash(history, ran_s=1.0) for _ in range(3)] == [1.0, 2.0, 4.0]
    assert history.restarts == 3
    assert policy.on_crash(history, ran_s=1.0) is None  # spent: the run stops
    assert history == CrashHistory(restarts=3, streak=3)  # a refused crash changes nothing
    assert policy.on_crash(CrashHistory(), ran_s=1.0) == 1.0  # another child has its own budget


def test_a_child_that_ran_stably_starts_a_new_streak_but_keeps_its_spent_budget() -> None:
    policy = RestartPolicy(max_restarts=4, initial_s=1.0, factor=2.0, max_s=60.0, stable_after_s=60.0)
    history = CrashHistory()
    assert policy.on_crash(history, ran_s=5.0) == 1.0
    assert policy.on_crash(history, ran_s=5.0) == 2.0  # crash loop: slower
    assert policy.on_crash(history, ran_s=600.0) == 1.0  # ran ten minutes: back to the first wait
    assert policy.on_crash(history, ran_s=5.0) == 2.0
    assert policy.on_crash(history, ran_s=600.0) is None  # four restarts were the budget


def test_restart_no_and_max_restarts_zero_restart_nothing() -> None:
    assert policy_for(RestartMode.NO, 5).on_crash(CrashHistory(), ran_s=100.0) is None
    assert policy_for(RestartMode.ON_FAILURE, 0).on_crash(CrashHistory(), ran_s=100.0) is None
    assert policy_for(RestartMode.ON_FAILURE, 2).max_restarts == 2
    assert RestartMode("on-failure") is RestartMode.ON_FAILURE


@pytest.mark.parametrize(
    "options",
    [{"max_restarts": -1}, {"initial_s": 0}, {"initial_s": 10, "max_s": 1}, {"factor": 0.5}],
)
def test_a_policy_that_cannot_work_is_refused(options: dict) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(**options)


def test_the_restart_log_counts_per_child_and_skips_a_half_written_line(tmp_path: Path) -> None:
    assert read_restarts(tmp_path) is None and restart_metrics(tmp_path) == {}  # not run by gd2po up
    start_log(tmp_path)
    assert restart_metrics(tmp_path) == {"restarts_total": 0}
    for child, attempt in (("redis", 1), ("trainer", 1), ("redis", 2)):
        append_restart(tmp_path, Restart(child, -9, attempt, 5, 0.5))
    with (tmp_path / RESTARTS_FILE).open("a") as log:
        log.write('{"child": "rollout", "exit')  # the writer was interrupted mid-line
    assert [r.child for r in read_restarts(tmp_path) or []] == ["redis", "trainer", "redis"]
    assert restart_metrics(tmp_path) == {"restarts_total": 3, "restarts/redis": 2, "restarts/trainer": 1}


def test_the_progress_view_shows_each_restart_once(capsys: pytest.CaptureFixture[str]) -> None:
    restarts = [Restart("rollout", -9, 1, 5, 0.5), Restart("trainer", 1, 1, 5, 0.5)]
    snapshot = Snapshot(title="t", total_steps=4, restarts=restarts)
    rows = dict(zip(render(snapshot).columns[0].cells, render(snapshot).columns[1].cells, strict=True))
    assert rows["restarts"] == "2 (rollout 1, trainer 1)"
    assert "restarts" not in list(render(Snapshot(title="t", total_steps=4)).columns[0].cells)
    assert restart_line(restarts[0]) == "restart: rollout exited with code -9; restart 1/5 in 0.5 s"

    with RunView(show=True) as view:  # not a terminal under pytest: one line per event
        view.show(Snapshot(title="t", total_steps=4, restarts=restarts[:1]))
        view.show(snapshot)
        view.show(snapshot)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [restart_line(restarts[0]), restart_line(restarts[1])]
