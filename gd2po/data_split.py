"""Split the tool-calling stand-in training set into a cold-start (SFT) part and an RL part, disjoint.

``data/tool_calling/rlla_sft400/train.parquet`` is the only tool-calling training set here, and its
ground truths are the SFT answers of the same items: a cold start on all of it would teach the RL
prompts' answers before RL starts. The rule: an item goes to SFT when the first 8 hex digits of
sha256(user message) fall below ``sft_fraction`` of the range, else to RL. Hashing the user message
(not the row position) keeps the split stable if rows are reordered, and puts every duplicate of a
dialogue on the same side. Both parts keep the file's schema, so the RL part is a drop-in prompt file
and the SFT part's ``reward_model.ground_truth`` is the SFT target.

    python -m gd2po.data_split            # rewrites data/tool_calling/rlla_split/{sft,rl}.parquet
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SOURCE = Path("data/tool_calling/rlla_sft400/train.parquet")
TARGET = Path("data/tool_calling/rlla_split")
SFT_FRACTION = 0.4


def user_message(row: dict) -> str:
    return next(m["content"] for m in row["prompt"] if m["role"] == "user")


def goes_to_sft(row: dict, sft_fraction: float = SFT_FRACTION) -> bool:
    digest = hashlib.sha256(user_message(row).encode()).hexdigest()
    return int(digest[:8], 16) < sft_fraction * 16**8


def split(source: Path = SOURCE, target: Path = TARGET, sft_fraction: float = SFT_FRACTION) -> dict[str, int]:
    """Write ``target/sft.parquet`` and ``target/rl.parquet``; returns the row count of each."""
    table = pq.read_table(source)
    to_sft = pa.array([goes_to_sft(row, sft_fraction) for row in table.to_pylist()])
    target.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, mask in (("sft", to_sft), ("rl", pa.compute.invert(to_sft))):
        part = table.filter(mask)
        pq.write_table(part, target / f"{name}.parquet")
        counts[name] = part.num_rows
    return counts


if __name__ == "__main__":
    print(split())
