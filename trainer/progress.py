"""A rich progress bar with the live GD²PO signals, shown only when stdout is a terminal."""

from __future__ import annotations

import sys

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class StepProgress:
    def __init__(self, total: int, start: int = 0):
        self.progress = None
        if sys.stdout.isatty():
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[signals]}"),
            )
            self.task = self.progress.add_task("train", total=total, completed=start, signals="")
            self.progress.start()

    def update(self, record: dict[str, float]) -> None:
        if self.progress is None:
            return
        signals = (
            f"loss {record.get('loss', 0):+.4f} conflict {record.get('conflict_ratio', 0):.2f} "
            f"keep {record.get('keep_ratio', 1):.2f}"
        )
        self.progress.update(self.task, completed=record["step"], signals=signals)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
