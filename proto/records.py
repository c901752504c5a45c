"""Data files as every service reads them: rows of a parquet or JSON-lines file, and the dotted field
paths the config uses to point into a row (``data.prompt_field``, ``data.label_field``,
``sft.completion_field``: ``reward_model.ground_truth`` is ``row["reward_model"]["ground_truth"]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.json as pajson
import pyarrow.parquet as pq


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of a ``.parquet``, ``.jsonl`` or ``.json`` (JSON lines) file as a dict.

    Raises ValueError for another suffix."""
    path = Path(path)
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        return pajson.read_json(path).to_pylist()
    raise ValueError(f"{path}: unsupported dataset format (use .parquet or .jsonl)")


def get_field(row: dict[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` in ``row``. Raises KeyError naming the missing part."""
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"field {path!r} not found (missing {part!r})")
        value = value[part]
    return value
