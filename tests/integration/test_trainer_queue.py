"""The real trainer (DeepSpeed on a tiny model, real Redis) at the edges of its queue: a second copy of
a group, groups it cannot train and undecodable entries, and groups of different ages — what it trains,
what it dead-letters, and what its metrics say."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import redis
from trainer_data import generate_groups, push, trainer_experiment

from gd2po.runlog import read_steps
from proto import Completion, PolicyAnnouncement, encode
from proto.config import ExperimentConfig
from proto.deadletter import raw_bytes, read_dead_letters
from proto.keys import RedisKeys
from proto.stream import entry_fields
from trainer.service import Trainer

pytestmark = pytest.mark.integration
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions")
)
KEYS = RedisKeys()


def experiment(tmp_path: Path, model_dir: Path, redis_url: str, **trainer) -> ExperimentConfig:
    return trainer_experiment(
        tmp_path,
        model_dir,
        redis_url,
        {
            "prompts_per_step": 2,
            "lr": 1e-4,
            "metrics_port": 0,
            "deepspeed": {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8},
            **trainer,
        },
    )


def sample(trainer: Trainer, name: str, **labels: str) -> float:
    value = trainer.metrics.registry.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


def test_staleness_histogram_observes_each_group_once(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    """Two groups at policy versions 5 and 2, trainer at version 5 (resumed after the rollout was
    announced version 5): gd2po_trainer_staleness observes {0, 3}: count 2, sum 3."""
    client = redis.Redis.from_url(redis_url)
    announced = PolicyAnnouncement(
        version=5, path=str(tmp_path), digest="blake3:" + "0" * 64, step=5, created_at=time.time()
    )
    client.set(KEYS.policy, encode(announced))
    new, old = generate_groups(tiny_model_dir, 2, seed=11)
    push(
        redis_url,
        [new.model_copy(update={"policy_version": 5}), old.model_copy(update={"policy_version": 2})],
    )
    config = experiment(
        tmp_path, tiny_model_dir, redis_url, total_steps=1, max_staleness=3, publish={"every": 0}
    )
    trainer = Trainer(config, resume=True)

    trainer.run()

    assert sample(trainer, "gd2po_trainer_staleness_count") == 2
    assert sample(trainer, "gd2po_trainer_staleness_sum") == 3
    buckets = {le: sample(trainer, "gd2po_trainer_staleness_bucket", le=le) for le in ("0.0", "2.0", "3.0")}
    assert buckets == {"0.0": 1, "2.0": 1, "3.0": 2}
    assert read_steps(tmp_path / "run")[0]["staleness_mean"] == 1.5  # the histogram's sum / count


def test_copies_and_groups_it_cannot_train_neither_train_twice_nor_stop_training(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    """Between four good groups: a second copy of one in the same pull and one in the next step of the
    same checkpoint window, a group lacking the configured reward 'b' (build_batch raised), one with a
    token id equal to the vocabulary size (the embedding forward raised) and undecodable bytes. Right:
    two steps train the four groups once each; the copies are acknowledged and counted as duplicates;
    the three others are dead-lettered with their reason and acknowledged; nothing stays pending."""
    good = generate_groups(tiny_model_dir, 4, seed=12)
    no_b = good[0].model_copy(update={"group_id": "no-b", "rewards": {"a": good[0].rewards["a"]}})
    kept = good[1].completions[2]  # a rollout GD²PO keeps (0 and 1 conflict): it is forwarded
    outside = Completion(
        token_ids=[*kept.token_ids[:-1], 49152], logprobs=kept.logprobs, text="", finish_reason="length"
    )
    vocab = good[1].model_copy(
        update={
            "group_id": "vocab",
            "completions": [*good[1].completions[:2], outside, good[1].completions[3]],
        }
    )
    client = redis.Redis.from_url(redis_url)
    push(redis_url, [good[0], good[0], no_b, vocab, good[1]])  # step 1: good[0], good[1]
    client.xadd(KEYS.groups, entry_fields(b"\x93garbage"))
    push(redis_url, [good[1], good[2], good[0], good[3]])  # step 2: good[2], good[3]
    trainer = Trainer(experiment(tmp_path, tiny_model_dir, redis_url, total_steps=2, checkpoint={"every": 2}))

    state = trainer.run()

    assert (state.step, state.groups_trained) == (2, 4)
    steps = read_steps(tmp_path / "run")
    assert [s["group_ids"] for s in steps] == [
        [good[0].group_id, good[1].group_id],
        [good[2].group_id, good[3].group_id],
    ]
    assert {m.decode() for m in client.smembers(KEYS.trained)} == {g.group_id for g in good}
    assert {m.decode() for m in client.smembers(KEYS.dead)} == {"no-b", "vocab"}
    assert client.xpending(KEYS.groups, KEYS.trainer_group)["pending"] == 0
    assert [(s["duplicates_total"], s["untrainable_total"], s["undecodable_total"]) for s in steps] == [
        (1, 2, 0),
        (3, 2, 1),
    ]
    outcomes = {
        o: sample(trainer, "gd2po_trainer_groups_total", outcome=o)
        for o in ("trained", "duplicate", "untrainable", "undecodable")
    }
    assert outcomes == {"trained": 4, "duplicate": 3, "untrainable": 2, "undecodable": 1}

    letters = [letter for _, letter in read_dead_letters(client, KEYS)]
    assert [(x.kind, x.group_id) for x in letters] == [
        ("untrainable", "no-b"),
        ("untrainable", "vocab"),
        ("undecodable", None),
    ]
    assert "rewards lack ['b']" in letters[0].reason
    assert (
        "completions[2].token_ids holds token id 49152, outside the model's vocabulary of 49152"
        in letters[1].reason
    )
    assert raw_bytes(letters[2]) == b"\x93garbage"
