"""The mixed-source prompt set of the conflict map: the committed file is the rule's output, half tool
calling (RL prompts only, never the cold start's) and half Alpaca, and a prompt file the config loads."""

from __future__ import annotations

import collections
from pathlib import Path

import pyarrow.parquet as pq

from gd2po.data_mix import ALPACA, TARGET, TOOL_CALLING, mix
from gd2po.data_split import user_message
from proto.config import load_config
from rollout_service.prompts import PromptSource

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_mix_is_what_the_rule_produces(tmp_path: Path) -> None:
    rows = mix(REPO_ROOT / TOOL_CALLING, REPO_ROOT / ALPACA, tmp_path / "train.parquet")
    assert pq.read_table(tmp_path / "train.parquet").equals(pq.read_table(REPO_ROOT / TARGET)), (
        f"{TARGET} is stale: run python -m gd2po.data_mix"
    )
    table = pq.read_table(REPO_ROOT / TARGET).to_pylist()
    assert rows == len(table) == 496
    assert collections.Counter(r["data_source"] for r in table) == {"rlla": 248, "Stanford Alpaca": 248}
    cold_start = {
        user_message(r)
        for r in pq.read_table(REPO_ROOT / "data/tool_calling/rlla_split/sft.parquet").to_pylist()
    }
    assert not cold_start & {user_message(r) for r in table if r["data_source"] == "rlla"}


def test_the_mixed_config_reads_both_sources() -> None:
    config = load_config(REPO_ROOT / "configs" / "conflict_map_mixed_cpu.yaml")
    source = PromptSource(
        [REPO_ROOT / f for f in config.data.train_files],
        prompt_field=config.data.prompt_field,
        label_field=config.data.label_field,
        seed=0,
    )
    assert {record.data_source for record in source.take(64)} == {"rlla", "Stanford Alpaca"}
