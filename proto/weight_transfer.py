"""Policy weights sent over a torch.distributed process group instead of a folder on disk
(``trainer.publish.transport: broadcast``; the contract both sides share).

One transfer is one gloo group — rank 0 the trainer, ranks 1… the workers of one rollout engine (one, or
its tensor-parallel size; each receives every bucket and loads its own shard) — formed
under ``transfer/<nonce>`` of the trainer's ``TCPStore`` when a rollout asks for it (a
:class:`proto.WeightRequest`). A group per transfer means a replica that dies or hangs costs only its own
transfer, never the others', and every step of it has a timeout: the store rendezvous, each bucket's
broadcast (cf. TRL #6796/#6797, a weight transfer that hung forever with no error).

Before the group forms the trainer writes the transfer's metadata (version, digest, bucket plan) under
``transfer/<nonce>/meta``. Then the weights go as a few large byte buffers ("buckets", at most
``bucket_bytes`` each unless one tensor is larger), each a concatenation of whole tensors in the plan's
order. The receiver checks the BLAKE3 digest over every buffer before loading anything, so a partial or
corrupted transfer is refused and the engine keeps its weights.

**Backends.** A group is gloo (host memory) or NCCL (GPU to GPU, what verl, OpenRLHF and TRL use between
GPUs). The receiver says in its request which it can join (:func:`local_backends`: NCCL only with a CUDA
device and a torch built with NCCL), the trainer picks one with ``trainer.publish.broadcast.backend``
(:func:`choose_backend`) and writes it in the metadata, so both sides always open the same kind (or an
``error`` when it refuses, so the receiver fails at once). Over NCCL both sides keep the version in host
memory and pass the buckets through one staging buffer on their GPU (the size of the largest bucket, not
a second model beside the engine's); the receiver checks the digest over its host copy before loading.
NCCL failures are kept in the transfer's thread (blocking wait, abort on failure: :func:`_nccl_group`).

What of NCCL is untested: this project's machines have no GPU and their torch has no NCCL, so the NCCL
group itself — its connect, the staging copies, the per-bucket timeout, the abort of a communicator whose
peer died, the environment it is created under, NCCL transfers beside the training's own communicator on
the trainer's GPU — has never run. Everything around it (the choice, the metadata and its refusal, a
receiver without NCCL refusing by name, the gloo path end to end) is tested.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import threading
from collections.abc import Iterator
from typing import Literal, NamedTuple

import blake3
import torch
import torch.distributed as dist

DTYPES = {
    name: getattr(torch, name)
    for name in (
        "float32",
        "bfloat16",
        "float16",
        "float64",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
    )
}
"""What a state dict may hold: weights, and the integer or boolean buffers some models keep."""
TRANSFER_PREFIX = "transfer"
Backend = Literal["gloo", "nccl"]
WATCHDOG_GRACE_S = 60.0
"""An NCCL group's own watchdog timeout is the transfer timeout plus this, so each bucket's ``wait``
times out first and aborts the group from the transfer's thread (see :func:`_nccl_group`)."""


class WeightTransferError(RuntimeError):
    """A transfer did not complete (timeout, peer gone, digest mismatch); the receiver keeps its weights."""


TensorSpec = tuple[str, str, list[int]]
"""(name, dtype name of :data:`DTYPES`, shape) of one tensor in a bucket."""


def local_backends(cuda: bool) -> list[Backend]:
    """The group kinds this process can join, preferred first: ``["nccl", "gloo"]`` when it has a CUDA
    device (``cuda``) and torch was built with NCCL, ``["gloo"]`` otherwise."""
    return ["nccl", "gloo"] if cuda and dist.is_nccl_available() else ["gloo"]


def choose_backend(
    preference: Literal["auto", "gloo", "nccl"], sender: list[Backend], receiver: list[Backend]
) -> Backend:
    """The group kind of one transfer (``trainer.publish.broadcast.backend``): ``auto`` is NCCL when both
    sides can join one, else gloo; ``gloo`` always gloo; ``nccl`` only NCCL. Raises WeightTransferError
    when ``nccl`` is asked and a side cannot (the replica then catches up from the folders)."""
    if preference == "gloo":
        return "gloo"
    both = "nccl" in sender and "nccl" in receiver
    if preference == "nccl" and not both:
        side = "the trainer" if "nccl" not in sender else "the rollout engine"
        raise WeightTransferError(
            f"trainer.publish.broadcast.backend is nccl but {side} cannot join an NCCL group "
            "(it needs a CUDA device and a torch built with NCCL); use backend: auto to fall back to gloo"
        )
    return "nccl" if both else "gloo"


def plan_buckets(state: dict[str, torch.Tensor], bucket_bytes: int) -> list[list[TensorSpec]]:
    """Group the tensors of ``state`` (in its order) into buckets of at most ``bucket_bytes`` bytes
    (padding included); a tensor larger than that gets a bucket of its own. Raises ValueError for a dtype outside DTYPES."""
    names = {dtype: name for name, dtype in DTYPES.items()}
    buckets: list[list[TensorSpec]] = [[]]
    size = 0
    for name, tensor in state.items():
        if tensor.dtype not in names:
            raise ValueError(
                f"{name}: dtype {tensor.dtype} cannot be transferred (supported: {list(DTYPES)})"
            )
        nbytes = -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN  # its span, padding included
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append((name, names[tensor.dtype], list(tensor.shape)))
        size += nbytes
    return [bucket for bucket in buckets if bucket]


def _nbytes(spec: TensorSpec) -> int:
    _, dtype, shape = spec
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=DTYPES[dtype]).element_size()


ALIGN = 8
"""Every tensor starts at a multiple of 8 bytes in its bucket (zero padding after the one before), so a
float32 after a bfloat16 of odd length can still be viewed in place."""


def _span(spec: TensorSpec) -> int:
    return -(-_nbytes(spec) // ALIGN) * ALIGN


def bucket_nbytes(bucket: list[TensorSpec]) -> int:
    """Bytes of one bucket's buffer (its tensors, each padded to :data:`ALIGN`)."""
    return sum(_span(spec) for spec in bucket)


def _padded_bytes(tensor: torch.Tensor) -> torch.Tensor:
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    pad = -data.numel() % ALIGN
    return torch.cat([data, data.new_zeros(pad)]) if pad else data


def pack(state: dict[str, torch.Tensor], buckets: list[list[TensorSpec]]) -> list[torch.Tensor]:
    """One contiguous uint8 CPU buffer per bucket: the bytes of its tensors, in order, each padded to
    :data:`ALIGN` (a copy, so the optimizer may go on changing ``state``)."""
    return [torch.cat([_padded_bytes(state[name]) for name, _, _ in bucket]) for bucket in buckets]


def unpack(
    buffers: list[torch.Tensor], buckets: list[list[TensorSpec]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) views into the received buffers, in plan order (no copy)."""
    for buffer, bucket in zip(buffers, buckets, strict=True):
        offset = 0
        for spec in bucket:
            name, dtype, shape = spec
            yield name, buffer[offset : offset + _nbytes(spec)].view(DTYPES[dtype]).view(shape)
            offset += _span(spec)


def buffers_digest(buffers: list[torch.Tensor]) -> str:
    """``blake3:<hex>`` over the (host) buffers' bytes, in order (the same algorithm as proto.weights)."""
    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for buffer in buffers:
        digest.update(buffer.numpy())
    return f"blake3:{digest.hexdigest()}"


def transfer_prefix(nonce: str) -> str:
    return f"{TRANSFER_PREFIX}/{nonce}"


def meta_key(nonce: str) -> str:
    return f"{transfer_prefix(nonce)}/meta"


class TransferMeta(NamedTuple):
    """What the trainer writes under ``transfer/<nonce>/meta`` before the group forms; ``error`` instead
    when it will not form one (the receiver then fails at once rather than at its timeout)."""

    version: int
    digest: str
    buckets: list[list[TensorSpec]]
    backend: Backend
    error: str = ""


def write_meta(store: dist.Store, nonce: str, meta: TransferMeta) -> None:
    store.set(meta_key(nonce), json.dumps(meta._asdict()))


def read_meta(store: dist.Store, nonce: str) -> TransferMeta:
    """Blocks until the trainer wrote the metadata (the store's timeout). Raises WeightTransferError."""
    try:
        meta = json.loads(store.get(meta_key(nonce)))
    except (dist.DistStoreError, RuntimeError) as exc:
        raise WeightTransferError(f"no transfer {nonce} offered by the trainer: {exc}") from exc
    if meta.get("error"):
        raise WeightTransferError(f"the trainer refused transfer {nonce}: {meta['error']}")
    return TransferMeta(
        version=int(meta["version"]),
        digest=str(meta["digest"]),
        buckets=[[tuple(spec) for spec in bucket] for bucket in meta["buckets"]],
        backend=meta.get("backend", "gloo"),  # a trainer from before NCCL wrote none: gloo
    )


def connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A client of the trainer's store. Raises WeightTransferError when it does not answer in time."""
    try:
        return dist.TCPStore(host, port, None, False, timeout=datetime.timedelta(seconds=timeout_s))
    except (dist.DistStoreError, RuntimeError) as exc:
        raise WeightTransferError(f"cannot reach the trainer's weight store at {host}:{port}: {exc}") from exc


def open_group(
    store: dist.Store,
    nonce: str,
    rank: int,
    timeout_s: float,
    size: int = 2,
    backend: Backend = "gloo",
    device: torch.device | None = None,
) -> dist.ProcessGroupGloo | dist.ProcessGroupNCCL:
    """The group of one transfer: rank 0 the trainer, ranks 1 … size − 1 the engine's workers (one for an
    engine without tensor parallelism). ``backend`` ``nccl`` needs this process's CUDA ``device``; its
    communicator is connected here, so a member that never joins fails here for both kinds. Raises
    WeightTransferError when a member does not join within ``timeout_s``, or for NCCL in a torch without
    it (or without a CUDA ``device``)."""
    prefixed = dist.PrefixStore(f"{transfer_prefix(nonce)}/group", store)
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "gloo":
        try:
            return dist.ProcessGroupGloo(prefixed, rank, size, timeout)
        except (dist.DistStoreError, RuntimeError) as exc:
            raise WeightTransferError(f"transfer {nonce}: the other side did not join: {exc}") from exc
    if not dist.is_nccl_available():
        raise WeightTransferError(
            f"transfer {nonce} is over NCCL but this process's torch has no NCCL "
            "(torch.distributed.is_nccl_available() is False)"
        )
    if device is None or device.type != "cuda":
        raise WeightTransferError(f"transfer {nonce} is over NCCL but this process has no CUDA device")
    try:
        group = _nccl_group(prefixed, rank, size, timeout_s)
    except (dist.DistStoreError, RuntimeError) as exc:
        raise WeightTransferError(f"transfer {nonce}: cannot create its NCCL group: {exc}") from exc
    try:
        group.eager_connect_single_device(device)
    except (dist.DistStoreError, RuntimeError) as exc:
        abort(group)
        raise WeightTransferError(f"transfer {nonce}: the other side did not join: {exc}") from exc
    return group


_NCCL_ENV = threading.Lock()


def _nccl_group(store: dist.Store, rank: int, size: int, timeout_s: float) -> dist.ProcessGroupNCCL:
    """An NCCL group whose failures stay in the transfer's thread. ProcessGroupNCCL reads its error
    handling from the environment when constructed: with TORCH_NCCL_BLOCKING_WAIT a failed or timed-out
    collective raises in the ``wait`` of the thread that waits, instead of in the watchdog thread, which
    with torch's default TORCH_NCCL_ASYNC_ERROR_HANDLING ends the whole process (a dead replica must not
    take the trainer down). The variables are set for the construction only (under a lock: transfers run
    on threads), so the training's own groups keep the user's settings. The non-blocking connect gives up
    after TORCH_NCCL_NONBLOCKING_TIMEOUT (default 30 min; torch reads it once per process), set here to
    the transfer timeout unless the user set it."""
    options = dist.ProcessGroupNCCL.Options()
    # The watchdog's own limit, later than each bucket's wait: the wait raises and aborts first.
    options._timeout = datetime.timedelta(seconds=timeout_s + WATCHDOG_GRACE_S)
    options.config.blocking = 0  # a non-blocking communicator can be aborted while it connects
    os.environ.setdefault("TORCH_NCCL_NONBLOCKING_TIMEOUT", str(math.ceil(timeout_s)))
    scoped = {"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}
    with _NCCL_ENV:
        saved = {name: os.environ.get(name) for name in scoped}
        os.environ.update(scoped)
        try:
            return dist.ProcessGroupNCCL(store, rank, size, options)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def abort(group: dist.ProcessGroupGloo | dist.ProcessGroupNCCL) -> None:
    """Release a group at once (an NCCL communicator whose peer died would otherwise keep its kernels and
    memory); never raises."""
    with contextlib.suppress(RuntimeError):  # already aborted or never connected: nothing to release
        group.abort()


def close(group: dist.ProcessGroupGloo | dist.ProcessGroupNCCL) -> None:
    """Free a group after its transfer: an NCCL communicator holds device memory until shut down (a gloo
    group goes with the object); never raises."""
    if not isinstance(group, dist.ProcessGroupGloo):
        with contextlib.suppress(RuntimeError):
            group.shutdown()


def _broadcast_all(
    group: dist.ProcessGroupGloo | dist.ProcessGroupNCCL,
    buffers: list[torch.Tensor],
    timeout_s: float,
    root: bool,
    device: torch.device | None,
) -> None:
    """Broadcast each host buffer from rank 0 (``root``: this process), each waited for at most
    ``timeout_s`` (the thread blocks until the bucket is there, on either backend). With ``device`` (an
    NCCL group) every bucket passes through one staging buffer there, the size of the largest bucket: one
    bucket of device memory, never a second model. On failure the group is aborted and
    WeightTransferError raised."""
    timeout = datetime.timedelta(seconds=timeout_s)
    what = "sending" if root else "receiving"
    try:
        staging = None
        if device is not None:
            staging = torch.empty(
                max((b.numel() for b in buffers), default=0), dtype=torch.uint8, device=device
            )
        for buffer in buffers:
            wire = buffer if staging is None else staging[: buffer.numel()]
            if staging is not None and root:
                wire.copy_(buffer)
            group.broadcast(wire, 0, timeout).wait(timeout)
            if staging is not None and not root:
                buffer.copy_(wire)  # to host: waits for the copy
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError included
        abort(group)
        raise WeightTransferError(f"{what} weights failed: {exc}") from exc


def send(
    group: dist.ProcessGroupGloo | dist.ProcessGroupNCCL,
    buffers: list[torch.Tensor],
    timeout_s: float,
    device: torch.device | None = None,
) -> None:
    """Broadcast every buffer (host memory) from rank 0, through ``device`` for an NCCL group. Raises
    WeightTransferError."""
    _broadcast_all(group, buffers, timeout_s, True, device)


def receive(
    group: dist.ProcessGroupGloo | dist.ProcessGroupNCCL,
    buckets: list[list[TensorSpec]],
    digest: str,
    timeout_s: float,
    device: torch.device | None = None,
) -> list[torch.Tensor]:
    """Receive every bucket (ranks ≥ 1) into host memory (through ``device`` for an NCCL group) and check
    the digest over all of them. Raises WeightTransferError (timeout, sender gone, digest mismatch);
    nothing is returned unverified."""
    try:
        buffers = [torch.empty(bucket_nbytes(bucket), dtype=torch.uint8) for bucket in buckets]
    except RuntimeError as exc:
        abort(group)
        raise WeightTransferError(f"no memory for the received weights: {exc}") from exc
    _broadcast_all(group, buffers, timeout_s, False, device)
    actual = buffers_digest(buffers)
    if actual != digest:
        raise WeightTransferError(f"received weights digest {actual[:19]}… does not match {digest[:19]}…")
    return buffers
