"""The byte buckets weights travel in (proto/weight_transfer.py): any state dict of the dtypes a policy
has packs into buckets of bounded size and unpacks to the same tensors bit for bit, in order; the digest
changes with any byte; a dtype that cannot travel is refused by name."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from proto.config import load_config
from proto.weight_transfer import DTYPES, bucket_nbytes, buffers_digest, pack, plan_buckets, unpack

shapes = st.lists(st.integers(0, 7), min_size=1, max_size=3)  # empty tensors too


@settings(max_examples=80, deadline=None)
@given(
    tensors=st.lists(st.tuples(shapes, st.sampled_from(sorted(DTYPES))), min_size=1, max_size=12),
    bucket_bytes=st.integers(1, 400),
    seed=st.integers(0, 2**16),
)
def test_pack_then_unpack_gives_every_tensor_back_bit_for_bit(tensors, bucket_bytes: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    state = {
        f"layer.{i}.weight": torch.randn(shape, generator=generator).to(DTYPES[dtype])
        for i, (shape, dtype) in enumerate(tensors)
    }
    buckets = plan_buckets(state, bucket_bytes)
    buffers = pack(state, buckets)
    assert [name for bucket in buckets for name, _, _ in bucket] == list(state)  # order kept, none lost
    for bucket, buffer in zip(buckets, buffers, strict=True):
        assert buffer.dtype == torch.uint8 and buffer.numel() == bucket_nbytes(bucket)
        # A bucket holds more than its bound only when it is one tensor larger than the bound.
        assert buffer.numel() <= bucket_bytes or len(bucket) == 1
    restored = dict(unpack(buffers, buckets))
    assert restored.keys() == state.keys()
    for name, tensor in state.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor)


def test_the_digest_sees_one_flipped_byte_and_bucket_order() -> None:
    state = {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(3, dtype=torch.bfloat16)}
    buffers = pack(state, plan_buckets(state, 8))
    digest = buffers_digest(buffers)
    assert digest.startswith("blake3:") and len(digest) == 7 + 64
    flipped = [b.clone() for b in buffers]
    flipped[-1][0] ^= 1
    assert buffers_digest(flipped) != digest
    assert buffers_digest(list(reversed(buffers))) != digest


def test_a_dtype_that_cannot_travel_is_named() -> None:
    with pytest.raises(ValueError, match=r"phase: dtype torch.complex64 cannot be transferred"):
        plan_buckets({"phase": torch.zeros(2, dtype=torch.complex64)}, 1024)


def test_the_broadcast_transport_takes_its_settings_and_the_background_writer(tmp_path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("trainer:\n  publish: {transport: broadcast, background: true}\n")
    publish = load_config(path).trainer.publish  # background then writes the disk_every folders
    assert (publish.transport, publish.background) == ("broadcast", True)
    path.write_text("trainer:\n  publish: {transport: broadcast, broadcast: {disk_every: 5, timeout: 30}}\n")
    publish = load_config(path).trainer.publish
    assert (publish.transport, publish.broadcast.disk_every, publish.broadcast.timeout) == (
        "broadcast",
        5,
        30,
    )
