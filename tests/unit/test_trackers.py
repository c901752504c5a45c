"""Experiment trackers through their real clients, offline: TensorBoard event files read back with
TensorBoard's EventAccumulator, a W&B offline run read back with W&B's own transaction-log reader
(``wandb leet inspect --json``), an MLflow file store read back with MlflowClient. Each gets a step's
values under the peers' names, the config, and the completions table with per-reward scores; a tracker
that cannot start is a clear error at start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tracker_logs import (
    mlflow_client,
    tensorboard_events,
    tensorboard_texts,
    tracker_run_ids,
    wandb_offline_run,
    wandb_records,
)
from trainer_data import tiny_group

from proto.config import TRACKERS, ConfigError, ExperimentConfig, load_config
from trainer.trackers import (
    OPENERS,
    StepRollouts,
    TrackerError,
    Trackers,
    tracker_name,
    tracker_values,
)

REWARDS = {"correctness": [1.0, -2.0], "format": [0.0, 1.0]}


def experiment(tmp_path: Path, model_dir: Path, report_to: list[str], **tracking) -> ExperimentConfig:
    return ExperimentConfig(
        run={
            "name": "tracked",
            "output_dir": tmp_path / "run",
            "report_to": report_to,
            "tracking": {"completions_every": 2, "wandb_mode": "offline", **tracking},
        },
        model={"path": model_dir},
        rewards=[{"name": name, "url": "http://127.0.0.1:1"} for name in REWARDS],
    )


def record(step: int) -> dict:
    """A step record as the trainer writes it (trainer.service._record): families keyed by reward,
    pair and phase, aliases, non-series keys."""
    return {
        "time": 1.0e9,
        "step": step,
        "group_ids": ["g"],
        "loss": 0.5 * step,
        "pg_loss": 0.5 * step,
        "kl": 0.01,
        "approx_kl": 0.01,
        "kl_ref": 0.02,
        "clip_fraction": 0.1,
        "clip_frac": 0.1,
        "conflict_ratio": 0.25 * step,
        "keep_ratio": 1 - 0.25 * step,
        "reward_mean/correctness": -0.5 * step,
        "reward_std/correctness": 1.5,
        "zero_std_group_ratio/format": 0.0,
        "pair_conflict_ratio/correctness__format": 0.5,
        "phase/forward_backward": 2.0,
        "tokens_per_second": 100.0,
        "last_step_timestamp_seconds": 1.0e9,
    }


def rollouts() -> StepRollouts:
    group = tiny_group("g-1", rewards=REWARDS)
    group.completions[1] = group.completions[1].model_copy(update={"text": "second | answer\nline 2"})
    return StepRollouts([group], [0.7, -0.7])


def log_two_steps(config: ExperimentConfig) -> None:
    trackers = Trackers.open(config)
    for step in (1, 2):
        trackers.report(record(step), rollouts())
    trackers.close()


def test_record_keys_get_the_peers_names_and_each_value_is_logged_once() -> None:
    values = tracker_values(record(2))
    assert values == {
        "loss": 1.0,  # TRL
        "kl": 0.02,  # TRL: KL to the reference policy
        "actor/ppo_kl": 0.01,  # verl: KL to the behaviour policy
        "clip_ratio/region_mean": 0.1,  # TRL
        "conflict_ratio": 0.5,  # GD²PO's own: no peer has it
        "keep_ratio": 0.5,
        "rewards/correctness/mean": -1.0,  # TRL
        "rewards/correctness/std": 1.5,
        "rewards/format/frac_reward_zero_std": 0.0,
        "pair_conflict_ratio/correctness__format": 0.5,
        "timing_s/forward_backward": 2.0,  # verl
        "perf/throughput": 100.0,
    }
    assert tracker_name("step") is None and tracker_name("group_ids") is None


def test_tracker_tests_run_with_the_network_off(isolated_trackers: None) -> None:
    """The offline claims below are tested without network (tests/tracker_logs.py cut_off_the_network, used by the isolated_trackers fixture): a
    connection off the loopback fails in this process, and a child process is handed a dead proxy."""
    import socket
    import subprocess
    import sys

    from tracker_logs import DEAD_PROXY, NO_NETWORK

    with pytest.raises(OSError, match=NO_NETWORK):
        socket.create_connection(("192.0.2.1", 443), timeout=1)  # TEST-NET-1: never a real host
    child = subprocess.run(
        [sys.executable, "-c", "import urllib.request; print(urllib.request.getproxies()['https'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == DEAD_PROXY


def test_tensorboard_event_files_hold_every_step_the_config_and_the_completions(
    tmp_path: Path, smollm2_dir: Path, isolated_trackers: None
) -> None:
    log_two_steps(experiment(tmp_path, smollm2_dir, ["tensorboard"]))

    events = tensorboard_events(tmp_path / "run")
    means = events.Scalars("rewards/correctness/mean")
    assert [(e.step, e.value) for e in means] == [(1, -0.5), (2, -1.0)]
    assert [e.value for e in events.Scalars("conflict_ratio")] == [0.25, 0.5]
    assert "pg_loss" not in events.Tags()["scalars"]

    [(_, config)] = tensorboard_texts(events, "config")
    assert "name: tracked" in config and "report_to:" in config
    [(step, table)] = tensorboard_texts(events, "completions")  # every 2 steps: step 2 only
    assert step == 2
    lines = table.splitlines()
    assert lines[0] == "| step | group_id | prompt | completion | correctness | format | advantage |"
    assert lines[2].startswith("| 2 | g-1 | ") and lines[2].endswith("| ab | 1.0 | 0.0 | 0.7 |")
    assert lines[3].endswith("| second \\| answer<br>line 2 | -2.0 | 1.0 | -0.7 |")


def test_wandb_offline_run_holds_every_step_the_config_and_the_completions_table(
    tmp_path: Path, smollm2_dir: Path, isolated_trackers: None
) -> None:
    log_two_steps(experiment(tmp_path, smollm2_dir, ["wandb"], project="gd2po-test"))

    records = wandb_records(tmp_path / "run")
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [(h["_step"], h["rewards/correctness/mean"], h["conflict_ratio"]) for h in history] == [
        (1, -0.5, 0.25),
        (2, -1.0, 0.5),
    ]
    assert history[1]["completions._type"] == "table-file"
    [run] = [r["run"] for r in records if r["type"] == "run"]
    assert run["project"] == "gd2po-test" and run["display_name"] == "tracked"
    assert run["config"]["update"]["run"]["report_to"] == ["wandb"]
    assert tracker_run_ids(tmp_path / "run") == {"wandb": run["run_id"]}

    [table_file] = (wandb_offline_run(tmp_path / "run") / "files" / "media" / "table").glob(
        "completions_2_*.table.json"
    )
    table = json.loads(table_file.read_text())
    assert table["columns"] == [
        "step",
        "group_id",
        "prompt",
        "completion",
        "correctness",
        "format",
        "advantage",
    ]
    assert [row[3:] for row in table["data"]] == [
        ["ab", 1.0, 0.0, 0.7],
        ["second | answer\nline 2", -2.0, 1.0, -0.7],
    ]


def test_mlflow_file_store_run_holds_every_step_the_config_and_the_completions_table(
    tmp_path: Path, smollm2_dir: Path, isolated_trackers: None
) -> None:
    log_two_steps(experiment(tmp_path, smollm2_dir, ["mlflow"], project="gd2po-test"))

    client = mlflow_client(tmp_path / "run")
    run_id = tracker_run_ids(tmp_path / "run")["mlflow"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert client.get_experiment(run.info.experiment_id).name == "gd2po-test"
    history = client.get_metric_history(run_id, "rewards/correctness/mean")
    assert sorted((m.step, m.value) for m in history) == [(1, -0.5), (2, -1.0)]
    assert run.data.params["run.report_to"] == '["mlflow"]'
    assert run.data.params["rewards"].startswith('[{"name": "correctness"')
    artifacts = Path(client.download_artifacts(run_id, "", str(tmp_path / "artifacts")))
    assert (artifacts / "config.yaml").is_file()
    assert [p.name for p in (artifacts / "completions").iterdir()] == ["step_000002.json"]
    table = json.loads((artifacts / "completions" / "step_000002.json").read_text())
    assert table["columns"][4:] == ["correctness", "format", "advantage"]
    assert [row[4:] for row in table["data"]] == [[1.0, 0.0, 0.7], [-2.0, 1.0, -0.7]]


def test_a_resumed_trainer_continues_the_same_mlflow_run(
    tmp_path: Path, smollm2_dir: Path, isolated_trackers: None
) -> None:
    config = experiment(tmp_path, smollm2_dir, ["mlflow"], completions_every=0)
    trackers = Trackers.open(config)
    trackers.report(record(1), rollouts())
    trackers.close(failed=True)
    resumed = Trackers.open(config, resume=True)
    resumed.report(record(2), rollouts())
    resumed.close()

    client = mlflow_client(tmp_path / "run")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2]


def test_without_report_to_nothing_is_opened_or_written(tmp_path: Path, smollm2_dir: Path) -> None:
    trackers = Trackers.open(experiment(tmp_path, smollm2_dir, []))
    trackers.report(record(2), rollouts())
    trackers.close()
    assert not (tmp_path / "run").exists()


def test_wandb_online_without_credentials_fails_at_open_naming_the_settings(
    tmp_path: Path, smollm2_dir: Path, isolated_trackers: None
) -> None:
    config = experiment(tmp_path, smollm2_dir, ["tensorboard", "wandb"], wandb_mode="online")
    with pytest.raises(TrackerError) as failure:
        Trackers.open(config)
    message = str(failure.value)
    assert message.startswith("run.report_to: wandb could not start (")
    assert "WANDB_API_KEY" in message and "run.tracking.wandb_mode: offline" in message


def test_every_tracker_run_report_to_accepts_has_an_opener() -> None:
    assert tuple(OPENERS) == TRACKERS


def test_an_unknown_or_repeated_tracker_is_refused_when_the_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("run: {report_to: [tensorboard, neptune]}\n")
    with pytest.raises(ConfigError, match=r"run\.report_to\.1: Input should be 'tensorboard', 'wandb' or"):
        load_config(path)
    path.write_text("run: {report_to: [wandb, wandb]}\n")
    with pytest.raises(ConfigError, match=r"run\.report_to: Value error, names a tracker twice"):
        load_config(path)
