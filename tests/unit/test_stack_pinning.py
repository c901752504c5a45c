"""Default core split of `gd2po up` (affinity and thread-pool sizes) and taskset CPU-list counting."""

import pytest

from gd2po.stack import _count_cpus, placement, split_cores


@pytest.mark.parametrize(
    ("cpus", "expected"),
    [
        ([0, 1], {"rollout": "0", "reward": "0", "trainer": "1"}),
        ([0, 1, 2, 3], {"rollout": "0,1", "reward": "0,1", "trainer": "2,3"}),
        ([2, 5, 7], {"rollout": "2", "reward": "2", "trainer": "5,7"}),
        ([0], {}),
    ],
)
def test_asynchronous_runs_split_the_cores(cpus: list[int], expected: dict[str, str]) -> None:
    assert split_cores(cpus, synchronous=False) == expected


def test_synchronous_runs_keep_every_core_for_each_side() -> None:
    assert split_cores([0, 1, 2, 3], synchronous=True) == {}


SPLIT_4 = {"rollout": "0,1", "reward": "0,1", "trainer": "2,3"}
THREADS_4 = {"rollout": 2, "reward": 2, "trainer": 2}


@pytest.mark.parametrize(
    ("synchronous", "pin", "auto_pin", "affinity", "threads"),
    [
        (False, {}, True, SPLIT_4, THREADS_4),  # default asynchronous run: pinned halves
        (False, {}, False, {}, THREADS_4),  # --no-auto-pin: no taskset, pools still halved
        (True, {}, True, {}, {}),  # synchronous: each side gets every core in turn
        (False, {"trainer": "3"}, True, {"trainer": "3"}, {"trainer": 1}),  # explicit --pin wins
        (True, {"rollout": "0-2"}, False, {"rollout": "0-2"}, {"rollout": 3}),
    ],
)
def test_placement(synchronous, pin, auto_pin, affinity, threads) -> None:
    assert placement([0, 1, 2, 3], synchronous, pin, auto_pin) == (affinity, threads)


@pytest.mark.parametrize(("cpu_list", "count"), [("0", 1), ("0,2", 2), ("0-3", 4), ("0-1,4,6-7", 5)])
def test_cpu_list_count(cpu_list: str, count: int) -> None:
    assert _count_cpus(cpu_list) == count
