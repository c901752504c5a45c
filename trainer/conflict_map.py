"""The conflict map: conflict, drop and per-pair conflict ratios of each step, split by the data source of
the prompts (``ScoredGroup.metadata["data_source"]``, from the prompt file's ``data_source`` column).

A mixed training set (tool calling next to free-text instructions, say) can hide where rewards fight: the
batch's conflict ratio averages sources whose rewards agree with sources where they pull apart. Per
source, the metrics are exactly what ``compute_advantages`` reports on that source's groups alone —
conflict and the keep rules are decided within a group (docs/algorithm.md §4), so splitting the batch by
whole groups changes no rollout's verdict (whitening, which mixes groups, does not enter these ratios).

Prometheus labels must stay bounded: the first ``limit`` distinct sources a trainer sees keep their name,
later ones are counted under ``other`` (``trainer.conflict_map_sources``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

OTHER = "other"
"""Label of every source beyond the first ``limit`` seen."""
UNKNOWN = "unknown"
"""Label of groups whose prompt carried no data source."""

Estimate = Callable[[Tensor, Tensor, Tensor], dict[str, float]]
"""(rewards [n, K], group ids [n], response mask [n, T]) → the estimator's metrics on those rollouts."""


MAX_LABEL_CHARS = 64


def clean_source(source: str | None) -> str:
    """A data source as a label every consumer accepts: Prometheus takes any text, but the record keys also
    go to the trackers, and MLflow refuses metric names with ``//`` or ``..`` or over 250 characters. Runs
    of characters outside ``[A-Za-z0-9 _.-]`` (and ``..``) become one ``_``; at most 64 characters; empty
    or missing → ``unknown``."""
    text = re.sub(r"(?:[^A-Za-z0-9 _.-]|\.\.)+", "_", (source or "").strip())
    return text[:MAX_LABEL_CHARS] or UNKNOWN


class SourceLabels:
    """Bounded label set: a source keeps its name if it is among the first ``limit`` distinct ones seen
    (for the trainer's lifetime, so a source's label never changes mid-run), else it becomes ``other``."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.limit = limit
        self.known: list[str] = []

    def label(self, source: str) -> str:
        source = clean_source(source)
        if source in self.known:
            return source
        if len(self.known) < self.limit:
            self.known.append(source)
            return source
        return OTHER


def conflict_map(
    rewards: Tensor,
    group_index: Tensor,
    response_mask: Tensor,
    group_sources: Sequence[str],
    labels: SourceLabels,
    estimate: Estimate,
) -> dict[str, float]:
    """Per-source ratios of one step's batch, as flat record keys.

    Args:
        rewards: [N, K] rewards. group_index: [N] position of each rollout's group in ``group_sources``.
        response_mask: [N, T]. group_sources: the data source of each group (``""`` = unknown).
        labels: the trainer's bounded label set. estimate: the step's estimator with its options (same τ).

    Returns:
        ``source_conflict_ratio/<source>``, ``source_drop_ratio/<source>`` and
        ``source_pair_conflict_ratio/<source>/<a>__<b>`` for every source in the batch; empty when
        ``labels.limit`` is 0 (the map is off).
    """
    if labels.limit == 0 or group_index.numel() == 0:
        return {}
    group_labels = [labels.label(source) for source in group_sources]
    row_labels = [group_labels[g] for g in group_index.tolist()]
    record: dict[str, float] = {}
    for source in dict.fromkeys(row_labels):  # first-seen order
        rows = torch.tensor([i for i, label in enumerate(row_labels) if label == source])
        metrics = estimate(rewards[rows], group_index[rows], response_mask[rows])
        record[f"source_conflict_ratio/{source}"] = metrics["conflict_ratio"]
        record[f"source_drop_ratio/{source}"] = metrics["drop_ratio"]
        for key, value in metrics.items():
            if key.startswith("pair_conflict_ratio/"):
                record[f"source_pair_conflict_ratio/{source}/{key.removeprefix('pair_conflict_ratio/')}"] = (
                    value
                )
    return record
