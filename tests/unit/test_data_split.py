"""The tool-calling SFT / RL split: disjoint by dialogue, stable, and the committed files are its output."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from gd2po.data_split import SOURCE, TARGET, split, user_message

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_split_is_what_the_rule_produces_and_is_disjoint(tmp_path: Path) -> None:
    counts = split(REPO_ROOT / SOURCE, tmp_path)
    assert counts == {"sft": 151, "rl": 248}
    for name in ("sft", "rl"):
        assert pq.read_table(tmp_path / f"{name}.parquet").equals(
            pq.read_table(REPO_ROOT / TARGET / f"{name}.parquet")
        ), f"{TARGET}/{name}.parquet is stale: run python -m gd2po.data_split"
    sft = {user_message(r) for r in pq.read_table(tmp_path / "sft.parquet").to_pylist()}
    rl = {user_message(r) for r in pq.read_table(tmp_path / "rl.parquet").to_pylist()}
    assert sft and rl and not sft & rl


def test_row_order_does_not_change_the_split(tmp_path: Path) -> None:
    table = pq.read_table(REPO_ROOT / SOURCE)
    pq.write_table(table.take(list(reversed(range(table.num_rows)))), tmp_path / "reversed.parquet")
    split(tmp_path / "reversed.parquet", tmp_path / "out")
    rl = {user_message(r) for r in pq.read_table(tmp_path / "out" / "rl.parquet").to_pylist()}
    expected = {user_message(r) for r in pq.read_table(REPO_ROOT / TARGET / "rl.parquet").to_pylist()}
    assert rl == expected
