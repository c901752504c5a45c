"""Training prompts from parquet/jsonl files: shuffled per epoch with a seed, carrying the ground truth
for the reward services, with a position that can be saved and restored so a restart resumes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.json as pajson
import pyarrow.parquet as pq

from proto import ChatMessage, PromptRecord


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        return pajson.read_json(path).to_pylist()
    raise ValueError(f"{path}: unsupported dataset format (use .parquet or .jsonl)")


def _dotted(row: dict[str, Any], path: str) -> Any:
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"field {path!r} not found (missing {part!r})")
        value = value[part]
    return value


def _messages(value: Any, field: str) -> list[ChatMessage]:
    if isinstance(value, str):
        return [ChatMessage(role="user", content=value)]
    if isinstance(value, list) and value:
        return [ChatMessage(role=m["role"], content=m["content"]) for m in value]
    raise ValueError(f"prompt field {field!r} must be text or a non-empty list of chat messages")


@dataclass
class Position:
    epoch: int = 0
    index: int = 0


class PromptSource:
    """Endless iterator over prompt records; each epoch is a fresh seeded permutation."""

    def __init__(self, files: list[Path], *, prompt_field: str, label_field: str | None, seed: int):
        self.records: list[PromptRecord] = []
        for path in files:
            for row_index, row in enumerate(_read_rows(Path(path))):
                label = _dotted(row, label_field) if label_field else None
                self.records.append(
                    PromptRecord(
                        prompt_id=f"{Path(path).stem}:{row_index}",
                        messages=_messages(_dotted(row, prompt_field), prompt_field),
                        label=None if label is None else str(label),
                        data_source=str(row.get("data_source", "")),
                    )
                )
        if not self.records:
            raise ValueError(f"no prompts in {files}")
        self.seed = seed
        self.position = Position()
        self._order = self._permutation(0)

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
