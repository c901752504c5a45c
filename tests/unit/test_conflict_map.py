"""The conflict map per data source (trainer/conflict_map.py): each source's ratios are exactly what the
estimator reports on that source's groups alone, labels stay bounded and stable, and the Prometheus series
follow the last step (a source absent from it has no value)."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from trainer.algorithms import compute_advantages
from trainer.conflict_map import MAX_LABEL_CHARS, OTHER, UNKNOWN, SourceLabels, clean_source, conflict_map
from trainer.metrics import TrainerMetrics

NAMES = ["brevity", "structure", "no_hedging"]


def estimate(rewards, group_index, mask):
    return compute_advantages("gd2po_snr", rewards, group_index, mask, tau=0.8, reward_names=NAMES).metrics


def batch(seed: int, sources: list[str], group_size: int = 4):
    generator = torch.Generator().manual_seed(seed)
    group_index = torch.arange(len(sources)).repeat_interleave(group_size)
    rewards = torch.randn(len(group_index), len(NAMES), generator=generator, dtype=torch.float64)
    return rewards, group_index, torch.ones(len(group_index), 5)


@pytest.mark.parametrize("seed", range(5))
def test_each_source_gets_the_estimators_verdict_on_its_own_groups(seed: int) -> None:
    sources = ["alpaca", "rlla", "alpaca", "", "rlla", "alpaca"]
    rewards, group_index, mask = batch(seed, sources)
    record = conflict_map(rewards, group_index, mask, sources, SourceLabels(8), estimate)

    for source, label in (("alpaca", "alpaca"), ("rlla", "rlla"), ("", UNKNOWN)):
        rows = torch.tensor([i for i, g in enumerate(group_index.tolist()) if sources[g] == source])
        alone = estimate(rewards[rows], group_index[rows], mask[rows])
        assert record[f"source_conflict_ratio/{label}"] == alone["conflict_ratio"]
        assert record[f"source_drop_ratio/{label}"] == alone["drop_ratio"]
        for pair in ("brevity__structure", "brevity__no_hedging", "structure__no_hedging"):
            assert (
                record[f"source_pair_conflict_ratio/{label}/{pair}"] == alone[f"pair_conflict_ratio/{pair}"]
            )
    # Rollout-weighted, the sources add up to the whole batch's ratios.
    whole = estimate(rewards, group_index, mask)
    rows = {"alpaca": 12, "rlla": 8, UNKNOWN: 4}
    for key in ("conflict_ratio", "drop_ratio"):
        combined = sum(record[f"source_{key}/{s}"] * n for s, n in rows.items()) / 24
        assert combined == pytest.approx(whole[key])


def test_labels_are_bounded_and_never_change_mid_run() -> None:
    labels = SourceLabels(2)
    assert [labels.label(s) for s in ("a", "b", "c", "a", "d", "b")] == ["a", "b", OTHER, "a", OTHER, "b"]
    rewards, group_index, mask = batch(0, ["c", "d", "a"])
    record = conflict_map(rewards, group_index, mask, ["c", "d", "a"], labels, estimate)
    assert {key.split("/")[1] for key in record} == {OTHER, "a"}  # c and d fold into one series
    with pytest.raises(ValueError):
        SourceLabels(-1)


def test_zero_sources_turns_the_map_off() -> None:
    rewards, group_index, mask = batch(0, ["a", "b"])
    assert conflict_map(rewards, group_index, mask, ["a", "b"], SourceLabels(0), estimate) == {}


def samples(metrics: TrainerMetrics, name: str) -> dict[tuple, float]:
    text = generate_latest(metrics.registry).decode()
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def test_gauges_follow_the_last_step_only() -> None:
    metrics = TrainerMetrics()
    metrics.record(
        {
            "source_conflict_ratio/Stanford Alpaca": 0.5,
            "source_conflict_ratio/rlla": 0.25,
            "source_drop_ratio/rlla": 0.125,
            "source_pair_conflict_ratio/rlla/brevity__structure": 0.75,
        },
        [],
    )
    assert samples(metrics, "gd2po_trainer_source_conflict_ratio") == {
        (("source", "Stanford Alpaca"),): 0.5,
        (("source", "rlla"),): 0.25,
    }
    assert samples(metrics, "gd2po_trainer_source_pair_conflict_ratio") == {
        (("pair", "brevity__structure"), ("source", "rlla")): 0.75
    }
    metrics.record({"source_conflict_ratio/rlla": 0.5}, [])
    assert samples(metrics, "gd2po_trainer_source_conflict_ratio") == {(("source", "rlla"),): 0.5}
    assert samples(metrics, "gd2po_trainer_source_drop_ratio") == {}


@pytest.mark.parametrize(
    ("source", "label"),
    [
        ("Stanford Alpaca", "Stanford Alpaca"),
        ("hf://org/set", "hf_org_set"),  # MLflow refuses "//" in a metric name; "/" would split the key
        ("a..b", "a_b"),  # MLflow refuses ".."
        ("", UNKNOWN),
        (None, UNKNOWN),
        ("  ", UNKNOWN),
    ],
)
def test_sources_become_labels_every_tracker_accepts(source, label) -> None:
    assert clean_source(source) == label
    assert SourceLabels(4).label(source) == label


def test_a_long_source_is_cut() -> None:
    assert clean_source("x" * 300) == "x" * MAX_LABEL_CHARS
