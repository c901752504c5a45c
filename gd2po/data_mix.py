"""A mixed-source RL prompt set for the conflict map: tool-calling prompts next to Alpaca instructions.

Every shipped training set has one ``data_source``, so the per-source conflict metrics
(trainer/conflict_map.py) would show one row. This set takes the tool-calling RL prompts
(``data/tool_calling/rlla_split/rl.parquet``, data_source ``rlla``: disjoint from the cold start's) and the
same number of Alpaca training instructions (``data/safe_alignment/alpaca_train.parquet``, data_source
``Stanford Alpaca``, a seeded sample without replacement), in a seeded shuffle. Both keep the files' shared
schema (data_source, prompt, ability, reward_model, extra_info), so it is a drop-in prompt file; it has no
common ground truth, so it is scored by rewards that need no label (configs/conflict_map_mixed_cpu.yaml).

    python -m gd2po.data_mix        # rewrites data/mixed/alpaca_rlla/train.parquet
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TOOL_CALLING = Path("data/tool_calling/rlla_split/rl.parquet")
ALPACA = Path("data/safe_alignment/alpaca_train.parquet")
TARGET = Path("data/mixed/alpaca_rlla/train.parquet")
SEED = 0


def mix(
    tool_calling: Path = TOOL_CALLING, alpaca: Path = ALPACA, target: Path = TARGET, seed: int = SEED
) -> int:
    """Write ``target``: every tool-calling row plus as many sampled Alpaca rows, shuffled; returns the rows."""
    tools = pq.read_table(tool_calling)
    instructions = pq.read_table(alpaca)
    rng = np.random.default_rng(seed)
    sample = instructions.take(np.sort(rng.choice(instructions.num_rows, tools.num_rows, replace=False)))
    # The two files' reward_model structs differ (a ground truth only for tool calling): unify the schema,
    # the missing fields become nulls.
    mixed = pa.concat_tables([tools, sample], promote_options="default")
    mixed = mixed.take(rng.permutation(mixed.num_rows))
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(mixed, target)
    return mixed.num_rows


if __name__ == "__main__":
    print(f"{TARGET}: {mix()} rows")
