"""``trainer.publish.transport: broadcast``: serve each policy version to the rollout engines over a
process group (proto/weight_transfer.py) instead of writing the whole model for every version.

Rank 0 hosts a ``TCPStore``. Each publish packs the weights into byte buckets (a copy, so training goes
on), computes their digest and announces a :class:`proto.WeightOffer` (version, digest, store address) on
the ``weights_offer`` key. A rollout that sees a newer offer between two batches pushes a
:class:`proto.WeightRequest`; a server thread pops requests and runs each transfer on its own thread with
its own group (gloo, or NCCL between GPUs: ``broadcast.backend``), always sending the newest version
packed. A transfer that fails (timeout, the replica killed mid-way) is logged and counted; the trainer
and the other transfers go on.

Every ``broadcast.disk_every`` publishes (the first included, and the last at close) the folder is
written and announced as with the disk transport, so a replica that restarts or misses transfers catches
up from the newest file, and the run's final policy is on disk; a replica's policy version never goes
backwards (the rollout loads whichever of offer and folder is newer). The offer is withdrawn at close and
when a new trainer process starts: nobody serves it any more.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
import time
from dataclasses import dataclass

import redis
import torch
import torch.distributed as dist
from prometheus_client import Counter, Histogram

from proto import WeightOffer, WeightRequest, decode, encode
from proto.codec import CodecError
from proto.config import BroadcastConfig
from proto.keys import RedisKeys
from proto.weight_transfer import (
    TransferMeta,
    WeightTransferError,
    buffers_digest,
    choose_backend,
    close,
    connect_store,
    local_backends,
    meta_key,
    open_group,
    pack,
    plan_buckets,
    send,
    unpack,
    write_meta,
)
from trainer.publisher import BackgroundPublisher, WeightPublisher

log = logging.getLogger("trainer.broadcaster")
POP_TIMEOUT_S = 1  # how long the server thread blocks on the request list before checking for close()


@dataclass(frozen=True)
class Packed:
    """One version ready to send: the buckets' plan, their bytes and digest."""

    version: int
    step: int
    buckets: list
    buffers: list[torch.Tensor]
    digest: str


class TransferMetrics:
    """``gd2po_trainer_weight_transfers_total{outcome}`` and ``gd2po_trainer_weight_transfer_seconds``."""

    def __init__(self, registry) -> None:
        self.transfers = Counter(
            "gd2po_trainer_weight_transfers",
            "Weight transfers to rollout engines over a process group, by outcome (ok, failed)",
            ["outcome"],
            registry=registry,
        )
        self.seconds = Histogram(
            "gd2po_trainer_weight_transfer_seconds",
            "Seconds of one weight transfer, from the group's rendezvous to the last bucket",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=registry,
        )
        for outcome in ("ok", "failed"):
            self.transfers.labels(outcome)


class BroadcastPublisher:
    """The ``publish``/``close`` interface of :class:`trainer.publisher.WeightPublisher` for the broadcast
    transport. ``disk`` writes the folders: a :class:`trainer.publisher.WeightPublisher`, or with
    ``trainer.publish.background`` a :class:`trainer.publisher.BackgroundPublisher` around one (a folder's
    failed write then surfaces at the next folder's publish, which raises as a failed write does);
    ``registry``: the trainer's Prometheus registry."""

    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        disk: WeightPublisher | BackgroundPublisher,
        config: BroadcastConfig,
        registry,
    ):
        self.client, self.keys, self.disk, self.config = client, keys, disk, config
        self.metrics = TransferMetrics(registry)
        # Over NCCL the packed copy stays in host memory and each bucket is staged on this rank's GPU (the
        # transfer threads must name it: a new thread's current CUDA device is device 0).
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else None
        self.backends = local_backends(cuda)
        if config.backend == "nccl" and "nccl" not in self.backends:
            raise ValueError(
                "trainer.publish.broadcast.backend is nccl but this trainer cannot join an NCCL group "
                "(no CUDA device, or a torch built without NCCL); use backend: auto or gloo"
            )
        self.store = dist.TCPStore(
            config.host, config.port, None, True, timeout=_seconds(config.timeout), wait_for_workers=False
        )
        self.address = (config.advertise or config.host, self.store.port)
        # Where this process reaches its own store: one client per transfer, because a TCPStore client
        # blocks all its callers while one of them waits (a replica that never joins would stall the rest).
        self._local = ("127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host, self.store.port)
        self.publishes = 0
        self._on_disk: int | None = None  # the newest version written as a folder
        self._module: torch.nn.Module | None = None  # for the config.json of the folder written at close
        self._latest: Packed | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._transfers: set[threading.Thread] = set()
        self._server = threading.Thread(target=self._serve, name="weight-broadcast", daemon=True)
        self._server.start()
        log.info("serving weights (%s) from %s:%d", "/".join(self.backends), *self.address)

    def withdraw_stale_offer(self) -> None:
        """Delete the offer (one left by an earlier trainer process: read it first when resuming; or this
        one's at close): nobody serves it, so rollouts follow the folders until the next offer."""
        self.client.delete(self.keys.weights_offer)

    def publish(
        self, module: torch.nn.Module, state: dict[str, torch.Tensor], version: int, step: int
    ) -> None:
        """Offer ``version``, first writing its folder at the first and every ``disk_every``-th publish. A
        failed folder write raises OSError before anything is offered, as with the disk transport (the
        version is then published again at the next step)."""
        if self.publishes % self.config.disk_every == 0:  # the 1st, (disk_every + 1)-th, … publish
            self.disk.publish(module, state, version, step)  # raises before the count moves: retried
            self._on_disk = version
        self.publishes += 1
        self._module = module
        buckets = plan_buckets(state, self.config.bucket_mib << 20)
        buffers = pack(state, buckets)
        packed = Packed(version, step, buckets, buffers, buffers_digest(buffers))
        with self._lock:
            self._latest = packed
        offer = WeightOffer(
            version=version,
            digest=packed.digest,
            step=step,
            host=self.address[0],
            port=self.address[1],
            created_at=time.time(),
        )
        self.client.set(self.keys.weights_offer, encode(offer))

    def close(self) -> None:
        """Stop serving (no new transfer starts; running ones finish or time out), withdraw the offer and
        write the last version's folder if it has none: the run's final policy always ends up on disk."""
        self._closing.set()
        self._server.join(timeout=POP_TIMEOUT_S + 5)
        for transfer in list(self._transfers):
            transfer.join(timeout=self.config.timeout)
        try:
            self.withdraw_stale_offer()
        except redis.RedisError as exc:  # the folder below matters more; rollouts skip a dead offer
            log.warning("could not withdraw the weight offer: %s", exc)
        latest = self._latest
        if latest is not None and latest.version != self._on_disk:
            # From the packed copy of that version, not the live parameters (they may have moved since,
            # or be half-updated when closing after a crash). Cloned: safetensors refuses shared storage.
            state = {name: tensor.clone() for name, tensor in unpack(latest.buffers, latest.buckets)}
            self.disk.publish(self._module, state, latest.version, latest.step)
            self._on_disk = latest.version
        self.disk.close()  # a background writer finishes its folders (and raises a failed one)

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                popped = self.client.blpop([self.keys.weights_requests], timeout=POP_TIMEOUT_S)
            except redis.RedisError as exc:  # Redis restarting: the requests wait in the list
                log.warning("cannot read weight requests: %s", exc)
                self._closing.wait(POP_TIMEOUT_S)
                continue
            if popped is None:
                continue
            try:
                self._start_transfer(popped[1])
            except Exception:  # nothing a request holds may end the server: every replica relies on it
                log.exception("dropped a weight request")

    def _start_transfer(self, raw: bytes) -> None:
        """Start the transfer a request asks for, on its own thread; an unreadable or expired request is
        logged and dropped."""
        try:
            request = decode(raw, WeightRequest)
        except (CodecError, ValueError) as exc:  # not msgpack / not a WeightRequest / fails its schema
            log.error("dropped an unreadable weight request: %s", str(exc)[:500])
            return
        if time.time() - request.created_at > self.config.timeout:
            return  # its rollout gave up waiting (e.g. while this trainer restarted)
        with self._lock:
            packed = self._latest
        if packed is None:
            return  # nothing offered yet by this trainer process: the replica falls back to disk
        transfer = threading.Thread(
            target=self._transfer, args=(request, packed), name=f"weight-transfer-{request.producer_id}"
        )
        self._transfers.add(transfer)
        transfer.start()

    def _transfer(self, request: WeightRequest, packed: Packed) -> None:
        started = time.perf_counter()
        store = group = None
        try:
            store = connect_store(*self._local, self.config.timeout)
            try:
                backend = choose_backend(self.config.backend, self.backends, request.backends)
            except WeightTransferError as exc:  # the receiver learns why at once, not at its timeout
                refused = TransferMeta(packed.version, packed.digest, [], "gloo", error=str(exc))
                write_meta(store, request.nonce, refused)
                store = None  # keep that metadata (bytes): the receiver may not have read it yet
                raise
            device = self.device if backend == "nccl" else None
            if device is not None:
                torch.cuda.set_device(device)
            write_meta(
                store, request.nonce, TransferMeta(packed.version, packed.digest, packed.buckets, backend)
            )
            group = open_group(
                store, request.nonce, 0, self.config.timeout, 1 + request.receivers, backend, device
            )
            send(group, packed.buffers, self.config.timeout, device)
        except WeightTransferError as exc:
            self.metrics.transfers.labels("failed").inc()
            log.warning(
                "weight transfer to %s failed (version %d): %s", request.producer_id, packed.version, exc
            )
        else:
            seconds = time.perf_counter() - started
            self.metrics.transfers.labels("ok").inc()
            self.metrics.seconds.observe(seconds)
            log.info(
                "sent policy version %d to %s over %s in %.2f s",
                packed.version, request.producer_id, backend, seconds,
            )  # fmt: skip
        finally:
            self._transfers.discard(threading.current_thread())
            if group is not None:
                close(group)
            if store is not None:
                with contextlib.suppress(RuntimeError):  # the store keeps no finished transfer's metadata
                    store.delete_key(meta_key(request.nonce))


def _seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)
