"""One queue state, reported under the same names with the same numbers by the trainer's metrics, the
rollout's metrics and the live view of ``gd2po up``."""

from __future__ import annotations

import re

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from gd2po.progress import RunView, Snapshot, render
from proto.stream import QUEUE_METRICS, QueueState
from rollout_service.metrics import RolloutMetrics
from trainer.metrics import TrainerMetrics

STATE = QueueState(lag=7, pending=3, dead_letters=2)


def _samples(registry, prefix: str) -> dict[str, float]:
    """Unlabelled samples whose name starts with ``prefix``, by name without it."""
    found = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if sample.name.startswith(prefix) and not sample.labels:
                found[sample.name.removeprefix(prefix)] = sample.value
    return found


def test_trainer_and_rollout_export_the_same_queue_gauges() -> None:
    trainer, rollout = TrainerMetrics(), RolloutMetrics()
    trainer.record({"step": 1.0, **STATE.as_metrics()}, [])
    rollout.record_queue(STATE)
    expected = {"queue_lag": 7.0, "queue_pending": 3.0, "queue_dead_letters": 2.0}
    trainer_queue = {k: v for k, v in _samples(trainer.registry, "gd2po_trainer_").items() if k in expected}
    rollout_queue = {k: v for k, v in _samples(rollout.registry, "gd2po_rollout_").items() if k in expected}
    assert trainer_queue == rollout_queue == expected
    assert set(QUEUE_METRICS) == set(expected)  # the documented names are the exported ones


def _text(table) -> str:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_the_live_view_shows_the_queue_state_under_the_metric_names() -> None:
    rows = {}
    for line in _text(render(Snapshot(title="t", total_steps=4, queue=STATE))).splitlines():
        cells = [cell.strip() for cell in line.strip("│┃ ").split("│")]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    assert {name: rows[name] for name in QUEUE_METRICS} == {
        "queue_lag": "7",
        "queue_pending": "3",
        "queue_dead_letters": "2",
    }
    unknown = _text(render(Snapshot(title="t", total_steps=4, queue=None)))
    assert all(f"{name}" in unknown for name in QUEUE_METRICS) and "?" in unknown


def test_the_view_without_a_terminal_prints_each_step_once(capsys) -> None:
    steps = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    with RunView(show=True) as view:  # pytest's stdout is no terminal: one line per step
        view.show(Snapshot(title="t", total_steps=2, steps=steps[:1]))
        view.show(Snapshot(title="t", total_steps=2, steps=steps))
        view.show(Snapshot(title="t", total_steps=2, steps=steps))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert lines == ["step 1  loss=0.5000", "step 2  loss=0.2500"]


def test_the_view_shows_each_rollout_replicas_policy_version_and_their_total_speed() -> None:
    replicas = [
        {"gd2po_rollout_policy_version": 3.0, "gd2po_rollout_tokens_per_second": 100.0},
        {},  # a replica that did not answer the scrape
        {"gd2po_rollout_policy_version": 2.0, "gd2po_rollout_tokens_per_second": 50.5},
    ]
    text = _text(render(Snapshot(title="t", total_steps=4, rollout=replicas)))
    assert re.search(r"rollout policy version\s*│\s*3 / \? / 2", text), text
    assert re.search(r"rollout tokens/s\s*│\s*150.5", text), text


def test_the_trainer_accounts_staleness_per_rollout_replica() -> None:
    metrics = TrainerMetrics()
    keys = metrics.record_producers(["rollout-0", "rollout-1", "rollout-0"], [0, 2, 1])
    assert keys == {"producer_staleness_mean/rollout-0": 0.5, "producer_staleness_mean/rollout-1": 2.0}
    metrics.count_stale(["rollout-1", "rollout-1"])
    values = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for sample in family.samples
    }
    trained = "gd2po_trainer_producer_groups_total"
    assert values[(trained, (("outcome", "trained"), ("producer", "rollout-0")))] == 2
    assert values[(trained, (("outcome", "stale"), ("producer", "rollout-1")))] == 2
    assert values[("gd2po_trainer_producer_staleness_sum", (("producer", "rollout-1"),))] == 2
    # Labels stay bounded: the 17th distinct producer id and later ones count as "other".
    metrics.record_producers([f"rollout-{i}" for i in range(40)], [0] * 40)
    assert len(metrics.producer_labels.known) == 16
