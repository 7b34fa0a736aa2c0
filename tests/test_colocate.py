"""Which transport each ring edge takes from where its ends are (issue 23), and the CUDA IPC
channel's message handling (on CPU with stand-ins for the IPC calls: no GPU here)."""

from __future__ import annotations

import itertools
import threading
from typing import Any

import pytest
import torch

from pipeline_core.colocate import (
    EdgeKind,
    IpcChannel,
    edge_kind,
    endpoint,
    pack_descriptor,
    ring_edges,
    unpack_descriptor,
)

from .test_transport_frames import _pair, _same

GPU_A, GPU_B = "cuda:GPU-aaaa", "cuda:GPU-bbbb"


def test_edge_kinds():
    assert edge_kind(f"{GPU_A}#10", f"{GPU_B}#11") == EdgeKind.NCCL
    assert edge_kind(f"{GPU_A}#10", f"{GPU_A}#11") == EdgeKind.CUDA_IPC
    assert edge_kind(f"{GPU_A}#10", f"{GPU_A}#10") == EdgeKind.LOCAL
    assert edge_kind("cpu#10", f"{GPU_A}#11") == EdgeKind.GLOO
    assert edge_kind("cpu#10", "cpu#11") == EdgeKind.GLOO
    assert edge_kind("cpu#10", "cpu#10") == EdgeKind.LOCAL
    with pytest.raises(ValueError, match="endpoints look like"):
        edge_kind("cuda:0", "cpu#1")


def test_ring_edges_mixed_host():
    """Stages 0 and 1 share GPU A, stage 2 has GPU B, stage 3 is a CPU stage: IPC, NCCL, gloo,
    and gloo again back to stage 0; the edge kind does not depend on which end asks."""
    ends = [endpoint(GPU_A, 1), endpoint(GPU_A, 2), endpoint(GPU_B, 3), endpoint("cpu", 4)]
    assert ring_edges(ends) == [EdgeKind.CUDA_IPC, EdgeKind.NCCL, EdgeKind.GLOO, EdgeKind.GLOO]
    assert [edge_kind(b, a) for a, b in itertools.pairwise(ends)] == ring_edges(ends)[:3]
    assert ring_edges(ends[:1]) == []
    assert ring_edges([endpoint(GPU_A, 1), endpoint(GPU_A, 2)]) == [EdgeKind.CUDA_IPC] * 2


def test_descriptor_roundtrip():
    meta = {
        "size": [2, 1, 768],
        "stride": [768, 768, 1],
        "dtype": torch.bfloat16,
        "device": 3,
        "offset": 5,
        "storage_bytes": 1 << 21,
        "storage_offset_bytes": 4096,
        "handle": bytes(range(64)),
        "ref_counter_handle": b"\x01" * 40,
        "ref_counter_offset": 7,
        "event_handle": None,
        "event_sync_required": True,
    }
    desc = pack_descriptor(meta)
    assert desc.dtype == torch.uint8 and desc.dim() == 1
    assert unpack_descriptor(desc) == meta


def test_ipc_channel_swaps_only_shared_tensors():
    """Over a real gloo pair: 'device' tensors (here: float ones) go as descriptors and come
    back through the opener; every other value arrives untouched, whatever its bytes."""
    a, b = _pair()
    store: dict[int, torch.Tensor] = {}

    def share(t: torch.Tensor) -> torch.Tensor:
        store[len(store)] = t
        return torch.tensor([len(store) - 1], dtype=torch.uint8)

    def is_shared(t: torch.Tensor) -> bool:
        return t.is_floating_point()

    send = IpcChannel(a, share=share, is_shared=is_shared)
    recv = IpcChannel(b, open_=lambda d: store[int(d[0])], is_shared=is_shared)
    act = torch.randn(1, 1, 8)
    msg = [
        2,
        0,
        None,
        torch.tensor([5]),
        ((7, (1,), (act,)),),
        torch.tensor([0], dtype=torch.uint8),
    ]
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(recv.recv(0)))
    t.start()
    send.send(msg, 1)
    send.flush()
    t.join(30)
    assert got and _same(msg, got[0])
    assert got[0][4][0][2][0] is act  # the very tensor, not a copy
    assert len(store) == 1


@pytest.mark.parametrize(
    ("mine", "theirs", "kind"), [("1", "1", "cuda_ipc"), ("1", "0", "gloo"), ("0", "1", "gloo")]
)
def test_either_end_can_turn_ipc_off(mine, theirs, kind):
    """An end reads the other's published endpoint and opt-out: one GPU, two processes is IPC
    unless either end turned it off (PIPESERVE_CUDA_IPC=0 at the edge: then both see it and
    fall back to gloo)."""
    import torch.distributed as dist

    from pipeline_core.colocate import choose_edge

    store = dist.HashStore()
    store.set("endpoint/1", f"{GPU_A}#1|{theirs}")  # the other end: pid 1, same GPU
    assert choose_edge(store, 0, GPU_A, cuda_ipc=mine == "1") == EdgeKind(kind)
    assert store.get("endpoint/0").decode().endswith(f"|{mine}")
