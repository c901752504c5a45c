"""Benchmark the vectorised advantage estimators against masked whitening and the per-group loop.

Run from the repository root: `python -m bench.advantages`. Targets, on a batch of 2048
prompts × 4 rollouts, K = 3, responses ≤ 1024 tokens (four times the published 512 prompts per step,
docs/algorithm.md §10, to stress the vectorised code): each estimator ≤ 3× one masked-whitening pass
over the same [N, T] tensor, and ≥ 10× faster than the straightforward per-group loop.
"""

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bench._common import cpu_model
from trainer.algorithms import ESTIMATORS, compute_advantages, masked_whiten

# The per-group loop is the tests' oracle and lives with them (tests/ is no package): timed here too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_loop import reference_advantages

PROMPTS, ROLLOUTS, REWARDS, MAX_TOKENS = 2048, 4, 3, 1024
FAST_REPEATS, LOOP_REPEATS = 9, 3


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Correctness and format in {0, 1} plus a continuous length reward, shuffled group ids."""
    n = PROMPTS * ROLLOUTS
    binary = torch.randint(0, 2, (n, 2), generator=generator).float()
    rewards = torch.cat([binary, torch.rand(n, 1, generator=generator)], dim=1)
    order = torch.randperm(n, generator=generator)
    group_ids = (torch.arange(n) // ROLLOUTS)[order] * 7919 - 10**9
    lengths = torch.randint(1, MAX_TOKENS + 1, (n,), generator=generator)
    mask = (torch.arange(MAX_TOKENS)[None, :] < lengths[:, None]).float()
    return rewards, group_ids, mask


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    rewards, group_ids, mask = make_batch(generator)
    values = torch.randn(mask.shape, generator=generator)
    whiten_s = median_seconds(lambda: masked_whiten(values, mask) * mask, FAST_REPEATS)

    console = Console(width=110)
    console.print(
        f"CPU: {cpu_model()} | cores: {os.cpu_count()} | torch {torch.__version__} | "
        f"threads: {torch.get_num_threads()}"
    )
    console.print(
        f"N = {mask.shape[0]} rollouts ({PROMPTS} prompts × {ROLLOUTS}), K = {REWARDS}, T = {MAX_TOKENS}, "
        f"{int(mask.sum())} response tokens (float32 mask)"
    )
    console.print(f"one masked-whitening pass over [N, T] (median): {whiten_s * 1e3:.1f} ms")
    table = Table("estimator", "vectorised ms", "× whitening pass", "loop ms", "speedup", "max |Δ| vs loop")
    for name in ESTIMATORS:
        fast_s = median_seconds(
            lambda name=name: compute_advantages(name, rewards, group_ids, mask), FAST_REPEATS
        )
        loop_s = median_seconds(
            lambda name=name: reference_advantages(name, rewards, group_ids, mask), LOOP_REPEATS
        )
        fast = compute_advantages(name, rewards, group_ids, mask)[0]
        difference = (
            fast.double() - reference_advantages(name, rewards, group_ids, mask)["advantages"]
        ).abs()
        table.add_row(
            name,
            f"{fast_s * 1e3:.1f}",
            f"{fast_s / whiten_s:.2f}",
            f"{loop_s * 1e3:.0f}",
            f"{loop_s / fast_s:.0f}×",
            f"{difference.max().item():.1e}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
