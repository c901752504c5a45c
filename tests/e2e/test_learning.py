"""The policy learns: the real stack — Redis, two reward services over HTTP, the vLLM rollout service, the
DeepSpeed trainer with GD²PO-SNR, weight publishing and in-place reloads — raises the rewards of a toy
task, and the same run with publishing off (the rollout never sees the trained policy) does not.

The task (``toy_learning_config``): a 32-token character policy answering letter strings, rewarded for
ending its answer within about two characters and for starting it with a vowel. Both rewards vary
within a group from the first step, so learning is fast; chance alone does not raise them. "Rose" is
gd2po.learning's rule: the last quarter's mean exceeds the first quarter's by more than twice the pooled
per-step standard deviation, for the range-normalised total and for ``short`` (the reward every seed
raised, by 5.7–7.0 sd; ``vowel`` rose by 1.1–2.7). A flipped advantage sign or a reload that does not
take effect makes this test fail (bench/RESULTS.md, "Learning test"). Known limit: a trainer that moved
the policy at random would pass now and then (a random walk "rises" ~30 % of the time, gd2po.learning).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from stack_helpers import finish, start_gd2po_up, toy_learning_config

from gd2po.learning import normalised_total, quarter_rise
from gd2po.models import build_toy_policy
from gd2po.runlog import read_steps
from proto.weights import is_adapter_folder

pytestmark = pytest.mark.e2e
STEPS = 64
REWARDS = ("short", "vowel")
RUN_TIMEOUT_S = 420
LORA = {"r": 8, "alpha": 16, "target_modules": "all-linear", "serve": "adapter"}  # vLLM's LoRA path
LORA_LR = 1e-3


@pytest.fixture(scope="module")
def toy_policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_policy(tmp_path_factory.mktemp("toy-policy"))


def run_learning_task(
    tmp_path: Path, model_dir: Path, redis_url: str, *, publish_every: int, **options
) -> list[dict]:
    config = toy_learning_config(tmp_path, model_dir, steps=STEPS, publish_every=publish_every, **options)
    run_dir = tmp_path / "run"
    process = start_gd2po_up(config, run_dir, {"GD2PO_REDIS__URL": redis_url})
    output = finish(process, RUN_TIMEOUT_S)
    assert process.returncode == 0, output[-4000:]
    steps = read_steps(run_dir)
    assert [int(s["step"]) for s in steps] == list(range(1, STEPS + 1))
    return steps


def total_reward(steps: list[dict]) -> list[float]:
    means = {name: [s[f"reward_mean/{name}"] for s in steps] for name in REWARDS}
    return normalised_total(means, {name: (0.0, 1.0) for name in REWARDS})


def test_gd2po_raises_the_rewards_of_the_toy_task(
    tmp_path: Path, toy_policy_dir: Path, redis_url: str
) -> None:
    steps = run_learning_task(tmp_path, toy_policy_dir, redis_url, publish_every=1)
    rise = quarter_rise(total_reward(steps))
    assert rise.rose(), f"total reward did not rise: {rise.describe()}"
    short = quarter_rise([s["reward_mean/short"] for s in steps])
    assert short.rose(), f"reward 'short' did not rise: {short.describe()}"
    # The rollout really sampled from trained policies: later groups carry newer versions.
    assert steps[-1]["policy_version"] == STEPS


def test_lora_training_raises_the_rewards_of_the_toy_task(
    tmp_path: Path, toy_policy_dir: Path, redis_url: str
) -> None:
    """The same task, training rank-8 adapters on every linear layer (``trainer.lora``) instead of the
    whole model, the rollout applying each step's adapter to its base model with vLLM's LoRA support
    (``trainer.lora.serve: adapter``; bench/RESULTS.md, "LoRA")."""
    steps = run_learning_task(tmp_path, toy_policy_dir, redis_url, publish_every=1, lr=LORA_LR, lora=LORA)
    assert is_adapter_folder(tmp_path / "run" / "weights" / f"step-{STEPS}")  # what the rollout loaded
    rise = quarter_rise(total_reward(steps))
    assert rise.rose(), f"total reward did not rise with LoRA: {rise.describe()}"
    short = quarter_rise([s["reward_mean/short"] for s in steps])
    assert short.rose(), f"reward 'short' did not rise with LoRA: {short.describe()}"
    assert steps[-1]["policy_version"] == STEPS


def test_without_publishing_the_rewards_stay_flat(
    tmp_path: Path, toy_policy_dir: Path, redis_url: str
) -> None:
    steps = run_learning_task(tmp_path, toy_policy_dir, redis_url, publish_every=0)
    rise = quarter_rise(total_reward(steps))
    assert not rise.rose(), f"rewards rose although the rollout never saw a trained policy: {rise.describe()}"
    assert steps[-1]["policy_version"] == 0
