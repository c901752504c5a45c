"""The trainer under ``torchrun`` with two ranks (gloo on CPU): rank 0 reads Redis and broadcasts each
batch, every rank trains its shard under ZeRO-2 (one optimizer partition each), and the run ends exactly
like a single-process one — every group trained once and acknowledged, one policy version per step,
published weights that moved and equal the checkpointed module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import torch
from safetensors.torch import load_file
from trainer_data import generate_groups, push

from gd2po.runlog import read_steps
from proto import PolicyAnnouncement, decode
from proto.config import dump_config
from proto.keys import RedisKeys
from tests.integration.test_trainer_service import experiment

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize("background_publish", [False, True])
def test_two_ranks_train_every_group_once(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str, background_publish: bool
) -> None:
    groups = generate_groups(tiny_model_dir, 4, seed=11)
    push(redis_url, groups)
    config = experiment(
        tmp_path,
        tiny_model_dir,
        redis_url,
        stage=2,
        checkpoint={"every": 1},
        publish={"background": background_publish},
    )
    config.trainer.metrics_port = 0
    config_file = tmp_path / "experiment.yaml"
    config_file.write_text(dump_config(config))
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env |= {"OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(
        [*torchrun, "-m", "trainer", "--config", str(config_file)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    steps = read_steps(tmp_path / "run")
    assert [s["step"] for s in steps] == [1, 2]
    assert [s["groups"] for s in steps] == [2, 2]
    assert sorted(g for s in steps for g in s["group_ids"]) == sorted(g.group_id for g in groups)
    client = redis.Redis.from_url(redis_url)
    keys = RedisKeys()
    assert client.scard(keys.trained) == 4
    assert client.xpending(keys.groups, "trainer")["pending"] == 0
    announcement = decode(client.get(keys.policy), PolicyAnnouncement)
    assert announcement.version == 2

    before = load_file(str(next(tiny_model_dir.glob("*.safetensors"))))
    after = load_file(str(Path(announcement.path) / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)

    # Both ranks took part: one ZeRO-2 optimizer partition each; the checkpointed module is what was published.
    checkpoint = tmp_path / "run" / "checkpoints" / "step-2"
    partitions = sorted(p.name for p in checkpoint.glob("*optim_states.pt"))
    assert len(partitions) == 2, partitions
    module = torch.load(next(checkpoint.glob("*model_states.pt")), weights_only=False)["module"]
    for name, tensor in after.items():
        torch.testing.assert_close(module[name].float(), tensor, msg=name)
