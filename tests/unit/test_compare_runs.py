"""`gd2po compare`: runs side by side from their metrics.jsonl and config.yaml."""

import json
from pathlib import Path

import matplotlib.image
import pytest
from typer.testing import CliRunner

from gd2po.cli import app
from gd2po.compare import load_runs, summarise, write_comparison


def fake_run(
    root: Path, name: str, estimator: str, rewards: dict[str, list[float]], conflict: list[float]
) -> Path:
    run_dir = root / name
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(
        f"run: {{name: {name}}}\ntrainer: {{advantage: {{estimator: {estimator}}}}}\n"
    )
    with (run_dir / "metrics.jsonl").open("w") as out:
        for step, ratio in enumerate(conflict, start=1):
            record = {"step": step, "conflict_ratio": ratio, "keep_ratio": 1 - ratio}
            record |= {f"reward_mean/{n}": values[step - 1] for n, values in rewards.items()}
            out.write(json.dumps(record) + "\n")
        out.write('{"step": 4, "conflict')  # a half-written last line is ignored
    return run_dir


def test_summary_has_last_and_mean_per_run_and_signal(tmp_path: Path) -> None:
    grpo = fake_run(tmp_path, "job-grpo", "grpo", {"a": [0.0, 0.5, 1.0]}, [0.0, 0.0, 0.0])
    snr = fake_run(
        tmp_path, "job-snr", "gd2po_snr", {"a": [0.0, 1.0, 1.0], "b": [2.0, 4.0, 6.0]}, [0.5, 0.25, 0.0]
    )
    runs = load_runs([grpo, snr])
    assert list(runs) == ["job-grpo · grpo", "job-snr · gd2po_snr"]
    summary = summarise(runs)
    assert list(summary) == ["reward_mean/a", "reward_mean/b", "conflict_ratio", "keep_ratio"]
    assert summary["reward_mean/a"] == {"job-grpo · grpo": (1.0, 0.5), "job-snr · gd2po_snr": (1.0, 2 / 3)}
    assert summary["reward_mean/b"] == {"job-snr · gd2po_snr": (6.0, 4.0)}  # only the run that logged it
    assert summary["keep_ratio"]["job-snr · gd2po_snr"] == (1.0, 0.75)


def test_cli_writes_a_figure_and_a_table(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path, f"job-{e}", e, {"a": [0.1, 0.2]}, [0.1, 0.3]) for e in ("gdpo", "gd2po_hard")]
    result = CliRunner().invoke(app, ["compare", *map(str, runs), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    image = matplotlib.image.imread(tmp_path / "cmp" / "comparison.png")
    assert image.shape[0] > 200 and image.shape[1] > 600
    text = (tmp_path / "cmp" / "comparison.txt").read_text()
    assert "job-gdpo · gdpo" in text and "job-gd2po_hard · gd2po_hard" in text and "0.300 (0.200)" in text


def test_errors_name_the_problem(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    run = fake_run(tmp_path, "job", "grpo", {"a": [1.0]}, [0.0])
    with pytest.raises(FileNotFoundError, match="no step records in .*empty/metrics.jsonl"):
        write_comparison([run, empty], tmp_path / "out", show=False)
    result = CliRunner().invoke(app, ["compare", str(run)])
    assert result.exit_code == 2 and "at least two run folders" in result.output
