"""The trainer on two "nodes": two separate ``torchrun --nnodes 2 --nproc-per-node 1`` process trees that
meet through a c10d rendezvous on 127.0.0.1, as the Helm chart starts one per pod (gloo on CPU, ZeRO-2).
Each node has LOCAL_RANK 0, so anything that took the local rank for the global one would read Redis,
publish or write on both. Global rank 0 alone reads Redis and exports metrics, the other node's first
process serves only the health routes its pod's probes need, and after both trees are killed mid-run
(a step trained but not checkpointed) a restart of the same topology with ``--resume`` loads each rank's
ZeRO shard from the shared checkpoint folder and finishes with every group trained once and acknowledged.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis
import torch
from safetensors.torch import load_file
from trainer_data import generate_groups, push

from gd2po.ports import free_port
from proto import PolicyAnnouncement, decode
from proto.config import dump_config
from proto.keys import RedisKeys
from tests.integration.test_trainer_service import experiment

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
KEYS = RedisKeys()
TIMEOUT = 240  # seconds for each phase; CI's 2 cores under load take ~1/4 of it


def journal(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


class Node:
    """One node's process tree: the torchrun agent (its own session) and the worker it spawns (torchrun
    puts each worker in a session of its own, so killing the agent's group would orphan it)."""

    def __init__(
        self, config: Path, node_rank: int, rdzv_port: int, health_port: int, log: Path, *extra: str
    ):
        env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
        env |= {
            "OMP_NUM_THREADS": "1",
            "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
            # Both nodes share the machine here; in the chart each pod has the same port on its own IP.
            "GD2PO_TRAINER__METRICS_PORT": str(health_port),
        }
        self.health_port, self.log = health_port, log
        command = [
            *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"),
            *("--node-rank", str(node_rank), "--rdzv-backend", "c10d"),
            *("--rdzv-endpoint", f"127.0.0.1:{rdzv_port}", "--rdzv-id", "gd2po-multinode-test"),
            *("-m", "trainer", "--config", str(config), *extra),
        ]
        with log.open("ab") as out:
            self.agent = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def workers(self) -> list[int]:
        """The agent's children (its workers), from /proc."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == self.agent.pid:
                    found.append(int(stat.parent.name))
        return found

    def kill(self) -> None:
        """SIGKILL the worker(s) and the agent, as a pod killed with its node would lose them."""
        for pid in self.workers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.agent.pid, signal.SIGKILL)
        self.agent.wait(timeout=30)

    def get(self, route: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{route}", timeout=5) as response:
            return response.status, response.read().decode()

    def tail(self) -> str:
        return self.log.name + ":\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


def start_pair(config: Path, tmp_path: Path, rdzv_port: int, tag: str, *extra: str) -> list[Node]:
    return [
        Node(config, rank, rdzv_port, free_port(), tmp_path / f"{tag}-node{rank}.log", *extra)
        for rank in (0, 1)
    ]


def wait_for(condition, nodes: list[Node], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        for node in nodes:
            assert node.agent.poll() is None, f"a node exited while waiting for {what}\n" + node.tail()
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n" + "\n".join(
            n.tail() for n in nodes
        )
        time.sleep(0.2)


def test_two_nodes_train_every_group_once_and_resume_after_a_kill(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    run_dir = tmp_path / "run"
    groups = generate_groups(tiny_model_dir, 8, seed=17)
    config = experiment(tmp_path, tiny_model_dir, redis_url, stage=2, total_steps=4, checkpoint={"every": 2})
    config_file = tmp_path / "experiment.yaml"
    config_file.write_text(dump_config(config))
    client = redis.Redis.from_url(redis_url)
    rdzv_port = free_port()  # the same endpoint after the restart, as the chart's fixed port

    # Three steps' worth: the nodes train steps 1–3 (checkpoint and acknowledgement after step 2), then
    # wait for more. Kill them there: step 3 is trained but in no checkpoint.
    push(redis_url, groups[:6])
    nodes = start_pair(config_file, tmp_path, rdzv_port, "first")
    try:
        wait_for(lambda: len(journal(run_dir)) == 3, nodes, "step 3")
        wait_for(lambda: all(_ready(n) for n in nodes), nodes, "both nodes ready")
        # Each node (pod) answers its probes; exactly one, global rank 0's, exports the trainer's metrics.
        exports = ["gd2po_trainer_loss" in node.get("/metrics")[1] for node in nodes]
        assert sorted(exports) == [False, True], exports
        assert all(node.get("/healthz")[0] == 200 for node in nodes)
    finally:
        for node in nodes:
            node.kill()

    assert [r["step"] for r in journal(run_dir)] == [1, 2, 3]  # one writer: rank 0
    assert client.scard(KEYS.trained) == 4  # what checkpoint step-2 holds
    pending = client.xpending(KEYS.groups, KEYS.trainer_group)
    assert pending["pending"] == 2, pending  # step 3's groups, delivered to rank 0 only
    step2 = run_dir / "checkpoints" / "step-2"
    assert len(list(step2.glob("*optim_states.pt"))) == 2  # one ZeRO-2 partition per node

    push(redis_url, groups[6:])
    nodes = start_pair(config_file, tmp_path, rdzv_port, "resumed", "--resume")
    try:
        deadline = time.monotonic() + TIMEOUT
        for node in nodes:
            code = node.agent.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert code == 0, node.tail()
    finally:
        for node in nodes:
            node.kill()

    produced = {g.group_id for g in groups}
    assert {m.decode() for m in client.smembers(KEYS.trained)} == produced
    assert client.xpending(KEYS.groups, KEYS.trainer_group)["pending"] == 0
    assert client.xlen(KEYS.deadletter) == 0 and client.scard(KEYS.stale) == 0
    records = journal(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 3, 4]  # step 3 redone from checkpoint step-2
    assert records[2]["group_ids"] == records[3]["group_ids"]  # the same redelivered groups
    effective = {r["step"]: r["group_ids"] for r in records}  # the later record of a step wins
    lineage = [gid for step in sorted(effective) for gid in effective[step]]
    assert sorted(lineage) == sorted(produced)  # each group in the final model's history exactly once

    # Both ranks resumed their own shard and saved the next one; the published policy is the checkpoint's.
    # Versions 1–3 before the kill; the resumed run continues from the announced 3 (never reusing a
    # version the rollout may hold) and publishes 4 (step 3 again) and 5 (step 4).
    announcement = decode(client.get(KEYS.policy), PolicyAnnouncement)
    assert announcement.version == 5
    final = run_dir / "checkpoints" / "step-4"
    assert len(list(final.glob("*optim_states.pt"))) == 2
    published = load_file(str(Path(announcement.path) / "model.safetensors"))
    module = torch.load(next(final.glob("*model_states.pt")), weights_only=False)["module"]
    for name, tensor in published.items():
        torch.testing.assert_close(module[name].float(), tensor, msg=name)


def _ready(node: Node) -> bool:
    try:
        return node.get("/readyz")[0] == 200
    except OSError:
        return False
