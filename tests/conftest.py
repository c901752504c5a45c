"""Shared fixtures: real Redis server processes, free ports, a tiny local model. No fakes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from gd2po.models import DEFAULT_MODEL_DIR, build_tiny_model, prepare_smollm2
from gd2po.redis_server import RedisProcess, free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
