"""Training prompts from parquet/jsonl files: shuffled per epoch with a seed, carrying the ground truth
for the reward services, with a position that can be saved and restored so a restart resumes. Prompts
over the token limit are dropped, refused or kept by an explicit policy, never cut silently."""

from __future__ import annotations

import json
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


@dataclass
class Position:
    epoch: int = 0
    index: int = 0


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
        self.position = Position()
        self._order = self._permutation(0)

    def limit_length(
        self, lengths: Callable[[list[PromptRecord]], list[int]], limit: int, policy: OverlongPolicy
    ) -> OverlongReport:
        """Apply the prompt length limit once, before the first :meth:`take` or :meth:`restore`.

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
            self._order = self._permutation(self.position.epoch)
        return report

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

    def take(self, count: int) -> list[PromptRecord]:
        batch = []
        for _ in range(count):
            if self.position.index >= len(self.records):
                self.position = Position(self.position.epoch + 1, 0)
                self._order = self._permutation(self.position.epoch)
            batch.append(self.records[int(self._order[self.position.index])])
            self.position.index += 1
        return batch

    def state(self) -> str:
        return json.dumps({"epoch": self.position.epoch, "index": self.position.index})

    def restore(self, state: str) -> None:
        values = json.loads(state)
        self.position = Position(int(values["epoch"]), int(values["index"]))
        self._order = self._permutation(self.position.epoch)
