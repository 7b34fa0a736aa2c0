"""The generation ring over real gloo groups (one thread per stage of this process): stage 0
receives on a thread into its inbox, later stages receive themselves with a receive always
posted; messages of every size go round in order, and stages that all send at once (large,
multi-part messages) never deadlock."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
import torch.distributed as dist

from pipeline_core.ring import Ring
from pipeline_core.ring_messages import Decode, Ping, Prefill, RingMessage, Stop
from pipeline_core.transport import FRAME, PACK_LIMIT

STAGES = 3


def _rings(n: int = STAGES) -> list[Ring]:
    store = dist.HashStore()
    rings: list[Any] = [None] * n
    threads = [
        threading.Thread(target=lambda i=i: rings.__setitem__(i, Ring(store, i, n, "cpu", 30.0)))
        for i in range(n)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None for r in rings), "the ring did not form"
    return rings


def _forward(ring: Ring, seen: list[RingMessage]) -> None:
    """A later stage: send every message on until Stop."""
    while True:
        msg = ring.recv()
        assert msg is not None
        seen.append(msg)
        ring.send(msg)
        if isinstance(msg, Stop):
            return


def _decode(i: int, hidden: int) -> Decode:
    act = torch.arange(hidden, dtype=torch.float32).reshape(1, 1, hidden) + i
    return Decode(i, None, torch.tensor([i]), ((7, (1,), (act,)),))


def _prefill(i: int, numel: int) -> Prefill:
    ids = torch.arange(8).reshape(1, 8) + i
    act = torch.randn(numel)
    return Prefill(
        i,
        ids,
        torch.ones_like(ids),
        torch.zeros(1, 3),
        torch.zeros(1, 2, dtype=torch.int64),
        None,
        ((3, (1,), (act,)),),
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(
            _same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__
        )
    return a == b


def _run(msgs: list[RingMessage], *, all_at_once: bool) -> list[RingMessage]:
    """``msgs`` sent round the ring by stage 0 (each waited for in turn, or all sent before
    any is taken back); what came back to stage 0."""
    rings = _rings()
    assert rings[0]._thread is not None, "stage 0 receives on a thread (its scheduler's inbox)"
    assert all(r._thread is None for r in rings[1:]), "later stages receive themselves"
    with pytest.raises(ValueError, match="without a timeout"):
        rings[1].recv(timeout=0.1)
    seen: list[list[RingMessage]] = [[] for _ in rings]
    threads = [threading.Thread(target=_forward, args=(r, seen[i])) for i, r in enumerate(rings)]
    for t in threads[1:]:
        t.start()
    back: list[RingMessage] = []

    def stage0() -> None:
        if all_at_once:
            for m in msgs:
                rings[0].send(m)
            back.extend(rings[0].recv(timeout=60) for _ in msgs)  # type: ignore[misc]
        else:
            for m in msgs:
                rings[0].send(m)
                back.append(rings[0].recv(timeout=60))  # type: ignore[arg-type]
        rings[0].send(Stop())
        back.append(rings[0].recv(timeout=60))  # type: ignore[arg-type]

    t0 = threading.Thread(target=stage0)
    t0.start()
    for t in [t0, *threads[1:]]:
        t.join(120)
    assert not any(t.is_alive() for t in [t0, *threads[1:]]), "the ring deadlocked"
    assert isinstance(back[-1], Stop)
    for s in seen[1:]:
        assert len(s) == len(msgs) + 1
    with pytest.raises(ConnectionError):  # a stopped ring receives nothing more
        rings[1].recv()
    return back[:-1]


def test_messages_go_round_in_order() -> None:
    """Decode steps of several sizes (inlined in the first frame, the frame's last bytes, and
    just over it) and control messages come back equal, in order."""
    fits = (8 * FRAME - 8 * 40) // 4  # floats that still fit beside a decode header
    msgs: list[RingMessage] = [
        _decode(0, 768),
        _decode(1, 4096),
        _decode(2, fits),
        Ping(),
        _decode(3, 8 * FRAME // 4),
        _decode(4, 16),
        _prefill(5, 10),
    ]
    back = _run(msgs, all_at_once=False)
    assert len(back) == len(msgs)
    for a, b in zip(msgs, back, strict=True):
        assert _same(a, b), f"{type(a).__name__} changed going round"


def test_stages_sending_at_once_do_not_deadlock() -> None:
    """Stage 0 sends many multi-part messages (payloads over the frame and over
    ``PACK_LIMIT``) before taking any back, so every stage sends while its successor also
    sends: each later stage's posted receive (and stage 0's thread) keeps them moving."""
    msgs: list[RingMessage] = [_prefill(i, PACK_LIMIT // 2 + i) for i in range(12)]
    back = _run(msgs, all_at_once=True)
    assert len(back) == len(msgs)
    for a, b in zip(msgs, back, strict=True):
        assert _same(a, b)
