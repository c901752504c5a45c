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

Only gloo is used (CPU tensors): it is what runs and is tested here. On GPUs the same protocol works over
host memory; an NCCL group (device-to-device, what verl and OpenRLHF use) is not implemented.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator

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


class WeightTransferError(RuntimeError):
    """A transfer did not complete (timeout, peer gone, digest mismatch); the receiver keeps its weights."""


TensorSpec = tuple[str, str, list[int]]
"""(name, dtype name of :data:`DTYPES`, shape) of one tensor in a bucket."""


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
    """``blake3:<hex>`` over the buffers' bytes, in order (the same algorithm as proto.weights)."""
    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for buffer in buffers:
        digest.update(buffer.numpy())
    return f"blake3:{digest.hexdigest()}"


def transfer_prefix(nonce: str) -> str:
    return f"{TRANSFER_PREFIX}/{nonce}"


def meta_key(nonce: str) -> str:
    return f"{transfer_prefix(nonce)}/meta"


def write_meta(
    store: dist.Store, nonce: str, version: int, digest: str, buckets: list[list[TensorSpec]]
) -> None:
    store.set(
        f"{transfer_prefix(nonce)}/meta",
        json.dumps({"version": version, "digest": digest, "buckets": buckets}),
    )


def read_meta(store: dist.Store, nonce: str) -> tuple[int, str, list[list[TensorSpec]]]:
    """Blocks until the trainer wrote the metadata (the store's timeout). Raises WeightTransferError."""
    try:
        meta = json.loads(store.get(meta_key(nonce)))
    except (dist.DistStoreError, RuntimeError) as exc:
        raise WeightTransferError(f"no transfer {nonce} offered by the trainer: {exc}") from exc
    return int(meta["version"]), str(meta["digest"]), [[tuple(spec) for spec in b] for b in meta["buckets"]]


def connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A client of the trainer's store. Raises WeightTransferError when it does not answer in time."""
    try:
        return dist.TCPStore(host, port, None, False, timeout=datetime.timedelta(seconds=timeout_s))
    except (dist.DistStoreError, RuntimeError) as exc:
        raise WeightTransferError(f"cannot reach the trainer's weight store at {host}:{port}: {exc}") from exc


def open_group(
    store: dist.Store, nonce: str, rank: int, timeout_s: float, size: int = 2
) -> dist.ProcessGroupGloo:
    """The gloo group of one transfer: rank 0 the trainer, ranks 1 … size − 1 the engine's workers (one
    for an engine without tensor parallelism). Raises WeightTransferError when a member does not join
    within ``timeout_s``."""
    try:
        return dist.ProcessGroupGloo(
            dist.PrefixStore(f"{transfer_prefix(nonce)}/group", store),
            rank,
            size,
            datetime.timedelta(seconds=timeout_s),
        )
    except (dist.DistStoreError, RuntimeError) as exc:
        raise WeightTransferError(f"transfer {nonce}: the other side did not join: {exc}") from exc


def send(group: dist.ProcessGroupGloo, buffers: list[torch.Tensor], timeout_s: float) -> None:
    """Broadcast every buffer from rank 0, each with its own timeout. Raises WeightTransferError."""
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        for buffer in buffers:
            group.broadcast(buffer, 0, timeout).wait()
    except RuntimeError as exc:
        raise WeightTransferError(f"sending weights failed: {exc}") from exc


def receive(
    group: dist.ProcessGroupGloo, buckets: list[list[TensorSpec]], digest: str, timeout_s: float
) -> list[torch.Tensor]:
    """Receive every bucket (rank 1) and check the digest over all of them. Raises WeightTransferError
    (timeout, sender gone, digest mismatch); nothing is returned unverified."""
    timeout = datetime.timedelta(seconds=timeout_s)
    buffers = [torch.empty(bucket_nbytes(bucket), dtype=torch.uint8) for bucket in buckets]
    try:
        for buffer in buffers:
            group.broadcast(buffer, 0, timeout).wait()
    except RuntimeError as exc:
        raise WeightTransferError(f"receiving weights failed: {exc}") from exc
    actual = buffers_digest(buffers)
    if actual != digest:
        raise WeightTransferError(f"received weights digest {actual[:19]}… does not match {digest[:19]}…")
    return buffers
