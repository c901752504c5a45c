"""The trainer's step records reach TensorBoard, W&B (offline) and MLflow (file store) exactly as it
writes them to metrics.jsonl: every series of every step, under one tracker name each, with the
completions table of the step's real rollouts; and a tracker that cannot start stops ``python -m
trainer`` at start with one line, before any model is loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tracker_logs import mlflow_client, tensorboard_events, tensorboard_texts, tracker_run_ids, wandb_history
from trainer_data import PLANTED, generate_groups, push, trainer_experiment

from gd2po.runlog import read_steps
from proto.config import dump_config
from trainer.algorithms import compute_advantages
from trainer.service import Trainer
from trainer.trackers import tracker_name, tracker_values

pytestmark = pytest.mark.integration
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions")
)
TRAINER = {
    "total_steps": 2,
    "prompts_per_step": 2,
    "max_staleness": 8,
    "deepspeed": {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4},
}


def test_every_step_record_reaches_each_tracker_with_the_rollouts_table(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str, isolated_trackers: None
) -> None:
    push(redis_url, generate_groups(tiny_model_dir, 4, seed=11))
    config = trainer_experiment(tmp_path, tiny_model_dir, redis_url, TRAINER)
    config.run.report_to = ["tensorboard", "wandb", "mlflow"]
    config.run.tracking.completions_every = 2
    config.run.tracking.completions_per_table = 3
    config.run.tracking.wandb_mode = "offline"

    Trainer(config).run()

    run_dir = tmp_path / "run"
    steps = read_steps(run_dir)
    assert [s["step"] for s in steps] == [1, 2]
    names = [tracker_name(key) for key in steps[0] if tracker_name(key) is not None]
    assert len(names) == len(set(names)), "two record keys share a tracker name"
    expected = {s["step"]: tracker_values(s) for s in steps}
    some = {"rewards/a/mean", "rewards/b/std", "conflict_ratio", "pair_conflict_ratio/a__b", "timing_s/wait"}
    assert some <= expected[1].keys()

    events = tensorboard_events(run_dir)
    tensorboard = {
        step: {name: v.value for name in expected[step] for v in events.Scalars(name) if v.step == step}
        for step in expected
    }
    for step in expected:
        assert tensorboard[step] == pytest.approx(expected[step])  # event files hold float32

    history = wandb_history(run_dir)
    assert [h["_step"] for h in history] == [1, 2]
    assert [{name: h[name] for name in expected[h["_step"]]} for h in history] == [expected[1], expected[2]]

    client = mlflow_client(run_dir)
    run_id = tracker_run_ids(run_dir)["mlflow"]
    mlflow = {step: {} for step in expected}
    for name in expected[1]:
        for metric in client.get_metric_history(run_id, name):
            mlflow[metric.step][name] = metric.value
    assert mlflow == expected
    params = client.get_run(run_id).data.params
    assert params["trainer.deepspeed.zero_optimization.stage"] == "2" and params["run.name"] == "gd2po-run"

    # The table of step 2: its first rollouts with the planted rewards a and b, and the advantages the
    # estimator gives the step's batch (8-token responses: a mask of ones).
    [(step, table)] = tensorboard_texts(events, "completions")
    rows = [row.strip("| ").split(" | ") for row in table.splitlines()[2:]]
    assert step == 2 and len(rows) == 3
    by_id = {g.group_id: g for g in generate_groups(tiny_model_dir, 4, seed=11)}
    first = by_id[steps[1]["group_ids"][0]]
    rewards = torch.tensor([[PLANTED["a"][i], PLANTED["b"][i]] for _ in range(2) for i in range(4)])
    advantages, _, _ = compute_advantages(
        "gd2po_snr", rewards, torch.arange(2).repeat_interleave(4), torch.ones(8, 8), reward_names=["a", "b"]
    )
    for i, cells in enumerate(rows):
        assert cells[1] == first.group_id and cells[3] == first.completions[i].text.replace("\n", "<br>")
        assert [float(cells[4]), float(cells[5])] == [PLANTED["a"][i], PLANTED["b"][i]]
        assert float(cells[6]) == pytest.approx(float(advantages[i, 0]), abs=1e-6)
    assert any(float(cells[6]) != 0 for cells in rows)
    assert dump_config(config).splitlines()[0] in tensorboard_texts(events, "config")[0][1]


def test_a_tracker_that_cannot_start_stops_the_trainer_at_start_with_one_line(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str, isolated_trackers: None
) -> None:
    config = trainer_experiment(tmp_path, tiny_model_dir, redis_url, TRAINER)
    config.run.report_to = ["wandb"]
    config.run.tracking.wandb_mode = "online"  # and no W&B credentials (isolated_trackers)
    path = tmp_path / "experiment.yaml"
    path.write_text(dump_config(config))

    result = subprocess.run(
        [sys.executable, "-m", "trainer", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
    )

    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "run.report_to: wandb could not start" in errors[0], result.stderr
    assert "WANDB_API_KEY" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() and "Loading weights" not in result.stderr
