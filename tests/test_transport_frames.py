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

from pipeline_core.errors import TransportError
from pipeline_core.transport import (
    _DTYPES,
    _LAYOUTS_KEPT,
    FRAME,
    PACK_LIMIT,
    Channel,
    StageFailure,
    decode_header,
    encode_header,
)


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
    """A decode step's message is one gloo send (the receiver posts no second receive), only
    as long as its header and payload (over gloo the frame is not sent whole)."""
    a, _ = _pair()
    msg = MESSAGES["decode step"]
    a.send(msg, 1)
    assert len(a._pending) == 1
    header, tensors = encode_header(msg)
    assert a.bytes_sent == 8 * (2 + len(header)) + sum(t.nbytes for t in tensors) < 8 * FRAME
    a._pending.clear()  # nobody receives it here


def test_shorter_frames_after_longer_ones() -> None:
    """A receive reuses its frame: a short message after a long one reads none of the long
    one's bytes left behind it (the header says where each message ends)."""
    big = [torch.arange(3000, dtype=torch.float32), (1, 2.5)]
    msgs = [big, [7], [None, torch.tensor([1.5])], big, [torch.zeros(0)], MESSAGES["decode step"]]
    got, _, _ = _roundtrip(msgs)
    for m, g in zip(msgs, got, strict=True):
        assert _same(m, g)


def _roundtrip(msgs: list[list[Any]]) -> tuple[list[list[Any]], Channel, Channel]:
    """Each message of ``msgs`` sent over one channel pair and received in order."""
    a, b = _pair()
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.extend(b.recv(0) for _ in msgs))
    t.start()
    for msg in msgs:
        a.send(msg, 1)
    a.flush()
    t.join(30)
    assert len(got) == len(msgs), "not everything arrived"
    return got, a, b


def _bytes(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64).remainder(251).to(torch.uint8)


_HEAD = 8 * 7  # a frame's two counts and a one-tensor message's 5 header ints, in bytes
BOUNDARIES = {  # a message, and the gloo messages it takes
    "payload filling the frame": ([_bytes(8 * FRAME - _HEAD)], 1),
    "payload a byte over the frame": ([_bytes(8 * FRAME - _HEAD + 1)], 2),
    "packed at PACK_LIMIT": ([_bytes(PACK_LIMIT)], 2),
    "own message over PACK_LIMIT": ([_bytes(PACK_LIMIT + 1)], 2),
    "inlined beside a large one": ([_bytes(PACK_LIMIT + 1), _bytes(5)], 2),
    "header filling the frame": ([None] + [0] * ((FRAME - 4) // 2), 1),
    "header an int over the frame": ([None, None] + [0] * ((FRAME - 4) // 2), 2),
}


@pytest.mark.parametrize("name", list(BOUNDARIES))
def test_frame_boundaries(name: str) -> None:
    """Sizes either side of what one frame holds and of what is packed: every byte arrives,
    in as many gloo messages as the layout says."""
    msg, messages = BOUNDARIES[name]
    (got,), a, _ = _roundtrip([msg])
    assert _same(msg, got)
    counted = Channel(a.pg)
    counted.send(msg, 1)
    assert len(counted._pending) == messages
    counted._pending.clear()  # nobody receives it


def test_every_value_kind_and_dtype() -> None:
    """Every dtype the header can name, odd layouts (a transposed view, a 0-d tensor, a
    conjugate view, a strided column) and every plain value kind arrive as sent."""
    tensors = [torch.randn(3, 5).mul(9).to(d) for d in _DTYPES]
    z = torch.randn(2, 3, dtype=torch.complex64)
    odd = [torch.randn(4, 6).t(), torch.tensor(3.5), z.conj(), torch.randn(2, 3)[:, 1]]
    plain = [0, -(2**62), 7, 1.25, -0.0, float("inf"), True, False, None]
    nested = (1, (2.5, (torch.ones(2), None)), [3, torch.zeros(1, dtype=torch.int8)])
    msg = [*tensors, *odd, *plain, nested, StageFailure("stage 2 failed: ü"), StageFailure("")]
    (got,), _, _ = _roundtrip([msg])
    assert _same(msg[:-2], got[:-2])
    assert [type(v) for v in got[:-2]] == [type(v) for v in msg[:-3]] + [tuple]
    assert [(f.message if isinstance(f, StageFailure) else f) for f in got[-2:]] == [
        "stage 2 failed: ü",
        "",
    ]
    conj = got[len(tensors) + 2]
    assert torch.equal(conj, z.conj().resolve_conj()) and not conj.is_conj()


def test_a_repeated_header_gives_fresh_tensors() -> None:
    """Decode steps repeat one header (decoded once): each message still gets its own values,
    in tensors of its own (a later message never overwrites an earlier one's)."""
    steps = [
        [2, 0, None, torch.tensor([i]), ((7, (1,), (torch.randn(1, 1, 8),)),)] for i in range(3)
    ]
    got, _, b = _roundtrip(steps)
    assert all(_same(s, g) for s, g in zip(steps, got, strict=True))
    assert len(b._layouts) == 1
    assert got[0][3].data_ptr() != got[1][3].data_ptr()


def test_remembered_headers_are_bounded() -> None:
    msgs = [[i, torch.tensor([i])] for i in range(_LAYOUTS_KEPT + 5)]
    got, _, b = _roundtrip(msgs)
    assert all(_same(m, g) for m, g in zip(msgs, got, strict=True))
    assert 0 < len(b._layouts) <= _LAYOUTS_KEPT


@pytest.mark.parametrize("header", [[2, 1, 5], [1, 0, 99, 1, 2], [1, 42]])
def test_corrupt_header_is_a_transport_error(header: list[int]) -> None:
    with pytest.raises(TransportError, match="corrupt message header"):
        decode_header(header)


def test_messages_in_a_row_share_nothing() -> None:
    """Every kind of message in turn over one channel (a receiver reuses its frame): each
    arrives intact and stays so while the ones after it arrive."""
    msgs = [*MESSAGES.values(), *(m for m, _ in BOUNDARIES.values()), MESSAGES["decode step"]]
    got, _, b = _roundtrip(msgs)
    assert all(_same(m, g) for m, g in zip(msgs, got, strict=True))
    assert b._spare is not None
