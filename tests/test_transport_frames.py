"""Channel messages over a real two-rank gloo group (two threads of this process): small
payloads travel inlined in the header frame (one gloo message per decode step), anything
else as before; every shape of message arrives intact."""

from __future__ import annotations

import datetime
import threading
from typing import Any

import pytest
import torch
import torch.distributed as dist

from pipeline_core.transport import FRAME, PACK_LIMIT, Channel


def _pair() -> tuple[Channel, Channel]:
    store = dist.HashStore()
    td = datetime.timedelta(seconds=30)
    pgs: list[Any] = [None, None]

    def make(rank: int) -> None:
        pgs[rank] = dist.ProcessGroupGloo(store, rank, 2, td)

    threads = [threading.Thread(target=make, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return Channel(pgs[0]), Channel(pgs[1])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


MESSAGES = {
    "decode step": [2, 0, None, torch.tensor([5]), ((7, (1,), (torch.randn(1, 1, 768),)),)],
    "no tensors": [9],
    "bool and bf16": [torch.tensor([True, False]), torch.randn(3, 5).to(torch.bfloat16), 1.5],
    "payload just over the frame": [torch.randn(FRAME * 2)],
    "header over the frame": [tuple(torch.tensor([i]) for i in range(FRAME // 4))],
    "large tensor": [torch.randn(PACK_LIMIT // 4 + 3), torch.arange(7)],
    "empty tensor": [torch.empty(0, 4), torch.tensor([1.0])],
}


@pytest.mark.parametrize("name", list(MESSAGES))
def test_channel_roundtrip(name: str) -> None:
    a, b = _pair()
    msg = MESSAGES[name]
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(b.recv(0)))
    t.start()
    a.send(msg, 1)
    a.flush()
    t.join(30)
    assert got and _same(msg, got[0])


def test_decode_step_is_one_gloo_message() -> None:
    """A decode step's message is one gloo send (the receiver posts no second receive)."""
    a, _ = _pair()
    a.send(MESSAGES["decode step"], 1)
    assert len(a._pending) == 1
    assert a.bytes_sent == FRAME * 8
    a._pending.clear()  # nobody receives it here
