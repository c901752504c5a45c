"""Shared fixtures: real Redis server processes, free ports, a tiny local model. No fakes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis
from tracker_logs import cut_off_the_network

from gd2po.environment import process_environment
from gd2po.models import DEFAULT_MODEL_DIR, build_tiny_model, prepare_smollm2
from gd2po.ports import free_port
from gd2po.redis_server import RedisProcess

for _name, _value in process_environment().items():
    os.environ.setdefault(_name, _value)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory):
    """One real redis-server process for the whole session."""
    with RedisProcess(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_session: RedisProcess) -> str:
    """A clean database on the session's real Redis server."""
    client = redis.Redis.from_url(redis_session.url)
    client.flushall()
    client.close()
    return redis_session.url


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct converted once into the project cache."""
    return prepare_smollm2(REPO_ROOT / DEFAULT_MODEL_DIR)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A random 2-layer Llama (head_dim 64) with SmolLM2's tokenizer and chat template, fp32."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), smollm2_dir)


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A random ~400K-parameter LlamaForSequenceClassification (one label) with SmolLM2's tokenizer
    and chat template; a wide init spreads its scores so comparisons between items mean something."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        max_position_embeddings=512,
        num_labels=1,
        initializer_range=0.5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    target = tmp_path_factory.mktemp("tiny-reward-model")
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture
def isolated_trackers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Experiment trackers see none of the caller's W&B or MLflow settings or credentials, and W&B's
    home folders are the test's."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc credentials
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "home" / name.lower()))
    cut_off_the_network(monkeypatch)
