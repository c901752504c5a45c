"""Training prompts from parquet/jsonl files: shuffled per epoch with a seed, carrying the ground truth
for the reward services. Prompts over the token limit are dropped, refused or kept by an explicit policy,
never cut silently.

The order is an endless sequence of positions: position p is the (p mod N)-th record of epoch p div N's
seeded permutation (N records). Rollout replicas claim positions from one counter in Redis
(:class:`rollout_service.producer.Producer.claim_prompts`), so any number of them — and each restart —
continue one shared order and every prompt is generated once per epoch across them. They must hold the
same order: :meth:`PromptSource.fingerprint` is checked against the first replica's at start."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from proto import ChatMessage, PromptRecord
from proto.records import get_field, read_rows


def _messages(value: Any, field: str) -> list[ChatMessage]:
    if isinstance(value, str):
        return [ChatMessage(role="user", content=value)]
    if isinstance(value, list) and value:
        return [ChatMessage(role=m["role"], content=m["content"]) for m in value]
    raise ValueError(f"prompt field {field!r} must be text or a non-empty list of chat messages")


OverlongPolicy = Literal["filter", "error", "truncate_left"]


class OverlongPrompts(ValueError):
    """Prompts exceed the token limit under ``data.overlong_prompts: error`` (or every prompt does)."""


@dataclass(frozen=True)
class OverlongReport:
    """What the length limit did to the dataset, for the start-up log and the rollout metrics."""

    policy: OverlongPolicy
    limit: int  # prompt tokens, chat template included
    loaded: int  # prompts read from the files
    overlong: int  # of those, longer than ``limit``
    longest: int  # tokens of the longest prompt

    @property
    def dropped(self) -> int:
        return self.overlong if self.policy == "filter" else 0

    @property
    def truncated(self) -> int:
        return self.overlong if self.policy == "truncate_left" else 0

    def describe(self) -> str:
        action = {"filter": "dropped", "truncate_left": "left-truncated (system message cut)"}
        what = action.get(self.policy, "refused")
        return (
            f"data.overlong_prompts={self.policy}: {what} {self.overlong} of {self.loaded} prompts longer "
            f"than {self.limit} tokens (longest {self.longest}); training on {self.loaded - self.dropped}"
        )


class PromptSource:
    """Endless iterator over prompt records; each epoch is a fresh seeded permutation."""

    def __init__(self, files: list[Path], *, prompt_field: str, label_field: str | None, seed: int):
        self.records: list[PromptRecord] = []
        for path in files:
            for row_index, row in enumerate(read_rows(Path(path))):
                label = get_field(row, label_field) if label_field else None
                self.records.append(
                    PromptRecord(
                        prompt_id=f"{Path(path).stem}:{row_index}",
                        messages=_messages(get_field(row, prompt_field), prompt_field),
                        label=None if label is None else str(label),
                        data_source=str(row.get("data_source") or ""),  # a null column is no "None" source
                    )
                )
        if not self.records:
            raise ValueError(f"no prompts in {files}")
        self.seed = seed
        self.cursor = 0  # the next position :meth:`take` returns (local use: bench, tests)
        self._orders: dict[int, np.ndarray] = {}  # epoch → permutation, the last few only

    def limit_length(
        self, lengths: Callable[[list[PromptRecord]], list[int]], limit: int, policy: OverlongPolicy
    ) -> OverlongReport:
        """Apply the prompt length limit once, before the first :meth:`at` or :meth:`take`.

        ``lengths`` gives each record's prompt tokens (chat template applied, untruncated); a prompt
        is overlong when it has more than ``limit`` tokens (the release keeps ``length <= limit``:
        verl ``RLHFDataset.maybe_filter_out_long_prompts``). ``filter`` drops overlong prompts and
        reshuffles what is left; ``error`` and ``truncate_left`` keep the records (the engine then
        keeps a prompt's last ``limit`` tokens). Raises :class:`OverlongPrompts` under ``error`` when
        any prompt is overlong, and under ``filter`` when every prompt is.
        """
        sizes = lengths(self.records)
        overlong = [record for record, size in zip(self.records, sizes, strict=True) if size > limit]
        report = OverlongReport(policy, limit, len(self.records), len(overlong), max(sizes, default=0))
        if overlong and policy == "error":
            first = ", ".join(record.prompt_id for record in overlong[:3])
            raise OverlongPrompts(
                f"{report.describe()} (first: {first}). Set data.overlong_prompts: filter to drop them, "
                "or raise model.max_prompt_tokens"
            )
        if overlong and policy == "filter":
            if len(overlong) == len(self.records):
                raise OverlongPrompts(f"{report.describe()}: no prompt fits; raise model.max_prompt_tokens")
            self.records = [r for r, size in zip(self.records, sizes, strict=True) if size <= limit]
            self._orders.clear()
        return report

    def _permutation(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            if len(self._orders) > 4:  # replicas move through epochs together: keep the recent ones
                self._orders.pop(min(self._orders))
            order = self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(
                len(self.records)
            )
        return order

    def at(self, start: int, count: int) -> list[PromptRecord]:
        """The records at positions ``start`` … ``start + count − 1`` of the endless order (epochs follow
        one another; each is a fresh seeded permutation). Raises ValueError for a negative ``start``."""
        if start < 0:
            raise ValueError(f"prompt position must be >= 0, got {start}")
        size = len(self.records)
        return [
            self.records[int(self._permutation(position // size)[position % size])]
            for position in range(start, start + count)
        ]

    def take(self, count: int) -> list[PromptRecord]:
        """The next ``count`` records of this source's own cursor (one process reading alone)."""
        batch = self.at(self.cursor, count)
        self.cursor += count
        return batch

    def fingerprint(self) -> str:
        """sha256 over the shuffle seed and every record (id, messages, label) in file order, after the
        length limit: equal for replicas that read the same files with the same ``data`` settings and
        tokenizer."""
        digest = hashlib.sha256(f"{self.seed}\n".encode())
        for record in self.records:  # ids, texts and labels: another file of the same length differs too
            digest.update(record.model_dump_json(include={"prompt_id", "messages", "label"}).encode() + b"\n")
        return f"sha256:{digest.hexdigest()}"
