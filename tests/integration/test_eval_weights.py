"""`gd2po eval api-bank --weights`: a run folder's newest published policy (or a model folder) is served by
a vLLM process started for the evaluation, scored, and the process is gone afterwards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gd2po.evaluate import model_folder

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_a_run_folder_means_its_newest_complete_published_weights(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    run = tmp_path / "run"
    for step in (2, 10, 9):
        shutil.copytree(tiny_model_dir, run / "weights" / f"step-{step}")
    (run / "weights" / "step-11").mkdir()  # being written: no config yet
    assert model_folder(run) == run / "weights" / "step-10"
    assert model_folder(tiny_model_dir) == tiny_model_dir
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        model_folder(tmp_path / "empty")


def test_eval_serves_the_weights_scores_every_level_and_stops_its_server(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "weights" / "step-3")
    output = tmp_path / "scores.jsonl"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "gd2po.cli", "eval", "api-bank", "--weights", str(run)),
            *("--limit", "1", "--max-tokens", "8", "--max-model-len", "2048", "--output", str(output)),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "step-3" in result.stdout and "overall" in result.stdout
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 3 and all(row["correct"] in (0, 1) for row in rows)
    log = tmp_path / "eval-vllm.log"
    assert log.is_file()
    leftover = subprocess.run(["pgrep", "-f", f"api_server --model {run}"], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "the evaluation's vLLM server outlived it"


def test_url_and_weights_are_exclusive(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gd2po.cli", "eval", "api-bank"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert result.returncode == 2 and "exactly one of --url and --weights" in result.stderr
