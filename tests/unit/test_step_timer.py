"""The trainer's step timer: one clock for every phase of a step."""

import time

import pytest

from trainer.metrics import PHASES, StepTimer, TrainerMetrics


def test_a_phase_entered_several_times_accumulates() -> None:
    timer = StepTimer()
    for _ in range(3):
        with timer.phase("forward_backward"):
            time.sleep(0.01)
    with timer.phase("publish"):
        pass
    assert timer.seconds["forward_backward"] >= 0.03
    assert timer.total() == pytest.approx(sum(timer.seconds.values()))
    assert timer.total() >= timer.seconds["forward_backward"]


def test_the_record_names_every_phase_even_one_never_entered() -> None:
    """A step whose rows all idle runs no forward/backward; its record still has phase/forward_backward."""
    record = StepTimer().record()
    assert record == {f"phase/{name}": 0.0 for name in PHASES}


def test_time_spent_in_a_phase_that_raises_still_counts() -> None:
    timer = StepTimer()
    with pytest.raises(RuntimeError), timer.phase("wait"):
        time.sleep(0.01)
        raise RuntimeError("redis went away")
    assert timer.seconds["wait"] >= 0.01


def test_an_unknown_phase_is_refused_so_every_timed_phase_is_exported() -> None:
    with pytest.raises(ValueError, match="unknown step phase 'pul'"), StepTimer().phase("pul"):
        pass
    metrics = TrainerMetrics()
    metrics.record(StepTimer().record(), [])
    for name in PHASES:
        assert (
            metrics.registry.get_sample_value("gd2po_trainer_step_phase_seconds_count", {"phase": name}) == 1
        )
