"""Which kind of group a weight transfer uses (proto/weight_transfer.py): NCCL only when the trainer and
the engine can both join one, gloo otherwise; ``backend: nccl`` never falls back silently; the choice (or
the trainer's refusal) travels in the transfer's metadata, and a process without NCCL refuses an NCCL
group by name."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from pydantic import ValidationError

from proto import WeightRequest
from proto.config import BroadcastConfig
from proto.weight_transfer import (
    TransferMeta,
    WeightTransferError,
    choose_backend,
    local_backends,
    meta_key,
    open_group,
    read_meta,
    write_meta,
)

BOTH, GLOO = ["nccl", "gloo"], ["gloo"]


@pytest.mark.parametrize(
    ("preference", "sender", "receiver", "chosen"),
    [
        ("auto", BOTH, BOTH, "nccl"),
        ("auto", BOTH, GLOO, "gloo"),  # a CPU replica of a GPU trainer
        ("auto", GLOO, BOTH, "gloo"),  # a CPU trainer (this machine)
        ("auto", GLOO, GLOO, "gloo"),
        ("gloo", BOTH, BOTH, "gloo"),
        ("nccl", BOTH, BOTH, "nccl"),
    ],
)
def test_the_group_kind_is_nccl_only_when_asked_for_and_both_sides_can(
    preference, sender, receiver, chosen
) -> None:
    assert choose_backend(preference, sender, receiver) == chosen


@pytest.mark.parametrize(
    ("sender", "receiver", "side"), [(BOTH, GLOO, "rollout engine"), (GLOO, BOTH, "trainer")]
)
def test_nccl_asked_for_where_a_side_cannot_join_names_that_side(sender, receiver, side) -> None:
    with pytest.raises(
        WeightTransferError, match=f"backend is nccl but the {side} cannot join an NCCL group"
    ):
        choose_backend("nccl", sender, receiver)


def test_a_process_offers_nccl_only_with_cuda_and_a_torch_built_with_it() -> None:
    assert local_backends(cuda=False) == GLOO
    assert local_backends(cuda=True) == (BOTH if dist.is_nccl_available() else GLOO)


def test_the_chosen_kind_travels_in_the_metadata_and_old_metadata_means_gloo() -> None:
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    meta = TransferMeta(3, "blake3:" + "ab" * 32, [[("w", "bfloat16", [2, 3])]], "nccl")
    write_meta(store, "feed" * 8, meta)
    assert read_meta(store, "feed" * 8) == meta
    store.set(meta_key("beef" * 8), '{"version": 1, "digest": "blake3:00", "buckets": []}')
    assert read_meta(store, "beef" * 8).backend == "gloo"  # a trainer from before NCCL existed
    write_meta(store, "dead" * 8, meta._replace(error="no NCCL on the rollout engine"))
    with pytest.raises(WeightTransferError, match="the trainer refused transfer d.*: no NCCL on the rollout"):
        read_meta(store, "dead" * 8)


@pytest.mark.skipif(dist.is_nccl_available(), reason="this torch has NCCL")
def test_an_nccl_group_in_a_torch_without_nccl_is_refused_at_once_with_the_reason() -> None:
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    with pytest.raises(WeightTransferError, match="over NCCL but this process's torch has no NCCL"):
        open_group(store, "feed" * 8, 1, timeout_s=60, backend="nccl")


def test_requests_and_config_accept_only_known_group_kinds() -> None:
    request = dict(producer_id="r", nonce="ab" * 8, version=1, created_at=0.0)
    assert WeightRequest(**request).backends == GLOO  # a rollout from before NCCL existed
    for bad in ([], ["mpi"], ["nccl", "gloo", "gloo"]):
        with pytest.raises(ValidationError):
            WeightRequest(**request, backends=bad)
    assert BroadcastConfig().backend == "auto"
    with pytest.raises(ValidationError, match="backend"):
        BroadcastConfig(backend="mpi")
