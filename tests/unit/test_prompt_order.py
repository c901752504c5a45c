"""The shared prompt order of rollout replicas (rollout_service.prompts): positions claimed in any
interleaving by any number of replicas name each prompt exactly once per epoch, and the order's
fingerprint tells apart replicas that would read different prompts at the same position."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout_service.prompts import PromptSource


def write_prompts(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(count)))
    return path


def source(path: Path, seed: int = 0) -> PromptSource:
    return PromptSource([path], prompt_field="prompt", label_field=None, seed=seed)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 40),
    batches=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 9)), min_size=1, max_size=40),
)
def test_claims_from_one_cursor_cover_every_epoch_once(tmp_path_factory, size: int, batches) -> None:
    """Replicas (each with its own PromptSource, as separate processes have) claim batches from one
    counter in any order: the prompts of each full epoch are a permutation of the dataset."""
    path = write_prompts(tmp_path_factory.mktemp("p") / "train.jsonl", size)
    replicas = [source(path) for _ in range(4)]
    cursor, drawn = 0, {}
    for replica, count in batches:
        start, cursor = cursor, cursor + count  # Producer.claim_prompts: INCRBY, start = end − count
        for offset, record in enumerate(replicas[replica].at(start, count)):
            drawn[start + offset] = record.prompt_id
    for epoch in range(cursor // size):
        ids = [drawn[p] for p in range(epoch * size, (epoch + 1) * size)]
        assert sorted(ids) == sorted(f"train:{i}" for i in range(size))


def test_epochs_are_fresh_permutations_and_take_follows_at(tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "train.jsonl", 50)
    first, second = source(path).at(0, 50), source(path).at(50, 50)
    assert [r.prompt_id for r in first] != [r.prompt_id for r in second]
    reader = source(path)
    assert [r.prompt_id for r in reader.take(30) + reader.take(40)] == [
        r.prompt_id for r in source(path).at(0, 70)
    ]
    with pytest.raises(ValueError, match="position must be >= 0"):
        source(path).at(-1, 2)


def test_the_fingerprint_changes_with_what_a_position_names(tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "train.jsonl", 20)
    assert source(path).fingerprint() == source(path).fingerprint()
    assert source(path).fingerprint() != source(path, seed=1).fingerprint()
    filtered = source(path)
    filtered.limit_length(lambda records: [len(r.messages[0].content) for r in records], 10, "filter")
    assert len(filtered.records) == 10 and filtered.fingerprint() != source(path).fingerprint()
    other = write_prompts(tmp_path / "other.jsonl", 20)
    assert source(other).fingerprint() != source(path).fingerprint()
