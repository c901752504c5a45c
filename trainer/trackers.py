"""Experiment trackers beside ``metrics.jsonl`` and Prometheus: TensorBoard, Weights & Biases, MLflow
(``run.report_to``), through their own client libraries.

Every tracker gets what the trainer records: each step's record (``Trainer.run`` writes it to
``metrics.jsonl`` and hands it here in the same place), renamed once by `tracker_name` to the names TRL's
GRPOTrainer and verl log where they have one; the run's config at start; and every
``run.tracking.completions_every`` steps a table of sample completions with their per-reward scores and
advantage (TRL's ``completions`` table).

A tracker that cannot start (library missing, no W&B credentials, unreachable MLflow server) stops the
trainer at start with `TrackerError`, one line naming the setting; a tracker that fails later raises as
well: logs are never dropped silently. On ``--resume`` the W&B and MLflow runs are continued (their ids
are kept in the run folder's ``trackers.json``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml
from torch import Tensor

from proto import ScoredGroup
from proto.config import ExperimentConfig, TrackingConfig, dump_config
from proto.startup import StartupError

IDS_FILE = "trackers.json"
"""In the run folder: the W&B and MLflow run ids, so a resumed trainer continues the same runs."""

# -- names ----------------------------------------------------------------------------------------
NOT_SERIES = frozenset({"time", "step", "group_ids", "last_step_timestamp_seconds"})
"""Record keys that are no per-step series: the step is the trackers' x axis, they stamp wall time
themselves, and group ids are not numbers."""
ALIASES = frozenset({"pg_loss", "approx_kl", "clip_frac"})
"""Record keys that repeat another one's value (``loss``, ``kl``, ``clip_fraction``; see
``trainer.step``): a tracker gets each value once."""
RENAMED = {
    # TRL GRPOTrainer: ``kl`` is the KL to the reference policy, ``clip_ratio/region_mean`` the tokens
    # where the PPO ratio is clipped.
    "kl_ref": "kl",
    "clip_fraction": "clip_ratio/region_mean",
    # verl: the KL to the behaviour policy, the dual-clip fraction, throughput.
    "kl": "actor/ppo_kl",
    "dual_clip_frac": "actor/pg_clipfrac_lower",
    "tokens_per_second": "perf/throughput",
}
"""Record key → the peer's name. Keys not listed (conflict, drop and keep ratios, loss, grad_norm,
learning_rate, entropy, queue state…) keep the record's name, which is also TRL's where TRL has one."""
RENAMED_FAMILIES = {
    "reward_mean/": "rewards/{}/mean",  # TRL
    "reward_std/": "rewards/{}/std",  # TRL
    "zero_std_group_ratio/": "rewards/{}/frac_reward_zero_std",  # TRL's frac_reward_zero_std, per reward
    "phase/": "timing_s/{}",  # verl
}
"""Record key prefix (a family keyed by reward or phase) → the peer's name pattern."""


def tracker_name(key: str) -> str | None:
    """The name a tracker logs the record's ``key`` under, or None when it is not logged as a series."""
    if key in NOT_SERIES or key in ALIASES:
        return None
    if key in RENAMED:
        return RENAMED[key]
    for prefix, pattern in RENAMED_FAMILIES.items():
        if key.startswith(prefix):
            return pattern.format(key.removeprefix(prefix))
    return key


def tracker_values(record: dict[str, Any]) -> dict[str, float]:
    """A step's record as the series trackers log: renamed by `tracker_name`, numbers only."""
    values = {}
    for key, value in record.items():
        name = tracker_name(key)
        if name is not None and isinstance(value, int | float):
            values[name] = float(value)
    return values


# -- sample completions ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StepRollouts:
    """A trained step's scored groups and each rollout's advantage, in batch order (group by group,
    completions in order): what the completions table shows."""

    groups: list[ScoredGroup]
    advantages: list[float]
    """One per rollout: its token advantage averaged over its response (constant for every estimator)."""

    @classmethod
    def of(cls, groups: list[ScoredGroup], advantages: Tensor, response_mask: Tensor) -> StepRollouts:
        """From the step's [N, T] token advantages and response mask (``TrainBatch`` rows)."""
        per_rollout = (advantages * response_mask).sum(dim=1) / response_mask.sum(dim=1).clamp(min=1.0)
        return cls(groups, per_rollout.tolist())


@dataclass(frozen=True)
class CompletionTable:
    """TRL's ``completions`` table: one row per rollout, a column per reward."""

    columns: list[str]
    rows: list[list[Any]]

    @classmethod
    def of(
        cls,
        step: int,
        rollouts: StepRollouts,
        reward_names: Sequence[str],
        decode_prompt: Any,
        limit: int,
    ) -> CompletionTable:
        rows: list[list[Any]] = []
        flat = ((g, i) for g in rollouts.groups for i in range(g.group_size))
        for (group, i), advantage in zip(flat, rollouts.advantages, strict=True):
            if len(rows) == limit:
                break
            rows.append(
                [
                    step,
                    group.group_id,
                    decode_prompt(group.prompt_token_ids),
                    group.completions[i].text,
                    *(group.rewards[name][i] for name in reward_names),
                    advantage,
                ]
            )
        return cls(["step", "group_id", "prompt", "completion", *reward_names, "advantage"], rows)

    def as_columns(self) -> dict[str, list[Any]]:
        return {name: [row[j] for row in self.rows] for j, name in enumerate(self.columns)}

    def as_markdown(self) -> str:
        """A Markdown table (TensorBoard's text plugin renders Markdown; it has no table type)."""

        def cell(value: Any) -> str:
            return str(value).replace("|", "\\|").replace("\n", "<br>")

        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)


# -- trackers -------------------------------------------------------------------------------------
class TrackerError(StartupError):
    """A tracker of ``run.report_to`` could not start; the message names it and what to change."""


class Tracker(Protocol):
    """One experiment tracker, opened with the run's config already logged."""

    run_id: str | None
    """The tracker's own run id, kept so a resumed trainer continues the run (None: nothing to keep)."""

    def log_values(self, values: dict[str, float], step: int) -> None: ...

    def log_completions(self, table: CompletionTable, step: int) -> None: ...

    def close(self, failed: bool) -> None:
        """End the run, marked failed when the trainer stopped on an error."""


class TensorBoardTracker:
    """Event files in the run folder's ``tensorboard/`` (``tensorboard --logdir RUN_DIR/tensorboard``)."""

    run_id = None

    def __init__(self, run_dir: Path, config: dict[str, Any], tracking: TrackingConfig, resumed: str | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if resumed is None:
            self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        self.writer.flush()

    def log_values(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a crash loses at most the step being written, as metrics.jsonl

    def log_completions(self, table: CompletionTable, step: int) -> None:
        self.writer.add_text("completions", table.as_markdown(), step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in ``run.tracking.project`` named ``run.name``; files under the run folder's ``wandb/``."""

    def __init__(self, run_dir: Path, config: dict[str, Any], tracking: TrackingConfig, resumed: str | None):
        import wandb

        self.run = wandb.init(
            project=tracking.project,
            name=config["run"]["name"],
            id=resumed,
            resume="allow" if resumed else None,
            dir=str(run_dir),
            mode=tracking.wandb_mode,
            config=config,
            # The trainer's own process owns signals and exit; W&B's console capture would duplicate
            # the service log.
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run_id: str | None = self.run.id
        self._table = wandb.Table

    def log_values(self, values: dict[str, float], step: int) -> None:
        # W&B ignores a step lower than one it has (a resumed run re-trains from its checkpoint).
        self.run.log(values, step=step)

    def log_completions(self, table: CompletionTable, step: int) -> None:
        self.run.log({"completions": self._table(columns=table.columns, data=table.rows)}, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    """An MLflow run in experiment ``run.tracking.project`` named ``run.name``: metrics per step, the
    config as parameters and ``config.yaml``, completion tables as ``completions/step_N.json``."""

    def __init__(self, run_dir: Path, config: dict[str, Any], tracking: TrackingConfig, resumed: str | None):
        from mlflow import MlflowClient

        uri = tracking.mlflow_tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 refuses a file store unless this is set; it is the one local store its client
            # (mlflow-skinny) writes without a database stack, and runs offline.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        if resumed is not None:
            self.run_id: str | None = resumed
            self.client.update_run(resumed, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(tracking.project)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(tracking.project)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=config["run"]["name"]).info.run_id
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in _flat_params(config).items()])
        self.client.log_dict(self.run_id, config, "config.yaml")

    def log_values(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for name, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_completions(self, table: CompletionTable, step: int) -> None:
        self.client.log_table(self.run_id, table.as_columns(), f"completions/step_{step:06d}.json")

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


OPENERS: dict[str, type[TensorBoardTracker | WandbTracker | MlflowTracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
}
"""Each name of ``run.report_to`` (``proto.config.TRACKERS``; a test checks both agree) and the tracker it
opens."""


class Trackers:
    """The trackers of ``run.report_to``, fed the trainer's step records (none: every call a no-op)."""

    def __init__(self, config: ExperimentConfig, trackers: dict[str, Tracker]):
        self.trackers = trackers
        self.tracking = config.run.tracking
        self.reward_names = config.reward_names
        self._tokenizer = None
        self._model_path = config.model.path

    @classmethod
    def open(cls, config: ExperimentConfig, *, resume: bool = False) -> Trackers:
        """Open every tracker of ``run.report_to``, or raise `TrackerError` naming the one that failed
        (those already open are closed)."""
        run_dir = Path(config.run.output_dir)
        ids_path = run_dir / IDS_FILE
        ids = json.loads(ids_path.read_text()) if resume and ids_path.is_file() else {}
        logged = yaml.safe_load(dump_config(config))  # without secrets, as the run folder's config.yaml
        opened: dict[str, Tracker] = {}
        for name in config.run.report_to:
            try:
                opened[name] = OPENERS[name](run_dir, logged, config.run.tracking, ids.get(name))
            except Exception as exc:
                for tracker in opened.values():
                    tracker.close(failed=True)
                raise TrackerError(_start_failure(name, exc)) from exc
        kept = {name: tracker.run_id for name, tracker in opened.items() if tracker.run_id is not None}
        if kept:
            run_dir.mkdir(parents=True, exist_ok=True)
            ids_path.write_text(json.dumps(kept))
        return cls(config, opened)

    def report(self, record: dict[str, Any], rollouts: StepRollouts) -> None:
        """Log one step's record, and its completions table when the step is due one."""
        if not self.trackers:
            return
        step = int(record["step"])
        values = tracker_values(record)
        for tracker in self.trackers.values():
            tracker.log_values(values, step)
        every = self.tracking.completions_every
        if every and step % every == 0:
            table = CompletionTable.of(
                step, rollouts, self.reward_names, self._decode_prompt, self.tracking.completions_per_table
            )
            for tracker in self.trackers.values():
                tracker.log_completions(table, step)

    def _decode_prompt(self, token_ids: list[int]) -> str:
        if self._tokenizer is None:  # only a run that logs completions needs it
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._model_path)
        return self._tokenizer.decode(token_ids)

    def close(self, *, failed: bool = False) -> None:
        for tracker in self.trackers.values():
            tracker.close(failed)


def _start_failure(name: str, exc: Exception) -> str:
    reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    if isinstance(exc, ImportError):
        fix = (
            "install the missing package (the trackers extra has the clients: pip install 'gd2po[trackers]')"
        )
    elif name == "wandb":
        fix = "set WANDB_API_KEY, or run.tracking.wandb_mode: offline (GD2PO_RUN__TRACKING__WANDB_MODE)"
    elif name == "mlflow":
        fix = "check run.tracking.mlflow_tracking_uri (GD2PO_RUN__TRACKING__MLFLOW_TRACKING_URI)"
    else:
        fix = "check that the run folder is writable"
    return f"run.report_to: {name} could not start ({reason}); {fix}, or remove it from run.report_to"


def _flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The config as MLflow parameters: dotted keys (``trainer.advantage.tau``), values as text; a list
    (``rewards``) is one JSON parameter."""
    params = {}
    for key, value in config.items():
        if isinstance(value, dict):
            params.update(_flat_params(value, f"{prefix}{key}."))
        else:
            params[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return params
