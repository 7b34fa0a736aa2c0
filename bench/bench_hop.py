"""The cost of one hop between two generation stages on this host (issue 23).

Two processes, one thread each, send a decode step's message back and forth; the one-way hop is
half the round trip; the CPU time both processes spend (every thread: the receiving one, gloo's)
per hop is reported too -- on a shared machine the wall-clock median moves with the other load
(a woken process waits for a core), the CPU time much less.  Three layers, each on top of the
one before:

* ``gloo``: one ``send``/``recv`` of a tensor of the activation's size on a two-rank gloo group;
* ``channel``: :class:`~pipeline_core.transport.Channel` with a decode step's message (one gloo
  message: header and payload in one frame);
* ``ring``: :class:`~pipeline_core.ring.Ring` (the channel; on rank 0, as on a pipeline's stage
  0, plus the receiving thread and the queue that hands the message to the scheduler; rank 1
  receives itself, as later stages do) -- what a pipeline step pays per stage.

Each is measured twice: back to back (the ping-pong keeps both processes awake), and with each
side computing ``gap_ms`` between receiving and sending on (a matmul loop), as a stage does, so
that every message lands on a process that had been idle that long -- what a hop costs in a
pipeline, where waking sleeping threads (and, on a VM, idle virtual CPUs) is much of it.  The
compute is timed on each side and taken out of the round trip.

    python -m bench.bench_hop --hidden 768 --gap-ms 20
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["hop_costs"]

KINDS = ("gloo", "channel", "ring")


def _message(hidden: int) -> Any:
    """A decode step's ring message at batch 1 (:class:`~pipeline_core.ring_messages.Decode`)."""
    from pipeline_core.ring_messages import Decode

    act = torch.randn(1, 1, hidden)
    return Decode(0, None, torch.zeros(1, dtype=torch.long), ((7, (1,), (act,)),))


def _busy(ms: float, a: torch.Tensor) -> float:
    """Compute for ``ms`` milliseconds; the seconds it took."""
    t0 = time.perf_counter()
    end = t0 + ms / 1e3
    while time.perf_counter() < end:
        torch.mm(a, a)
    return time.perf_counter() - t0


def _ends(kind: str, rank: int, store: dist.Store, hidden: int) -> tuple[Any, Any, Any]:
    """(send a message, receive one, close) of ``kind`` for ``rank`` of a two-rank pair."""
    other = 1 - rank
    if kind == "ring":
        from pipeline_core.ring import Ring
        from pipeline_core.ring_messages import Stop

        ring = Ring(store, rank, 2, "cpu", 60.0)
        msg = _message(hidden)

        def close() -> None:  # Stop ends rank 0's receiving thread
            if rank == 0:
                ring.send(Stop())
                ring.recv()
            else:
                ring.send(ring.recv())

        return (lambda: ring.send(msg)), ring.recv, close
    pg = dist.ProcessGroupGloo(store, rank, 2, datetime.timedelta(seconds=60))
    if kind == "gloo":
        buf = torch.randn(hidden)
        return (
            lambda: pg.send([buf], other, 0).wait(),
            lambda: pg.recv([buf], other, 0).wait(),
            lambda: None,
        )
    from pipeline_core.ring_messages import encode
    from pipeline_core.transport import Channel

    ch = Channel(pg)
    values = encode(_message(hidden))

    def send() -> None:
        ch.send(values, other)
        ch.flush()

    return send, (lambda: ch.recv(other)), lambda: None


def _peer(rank: int, port: int, kind: str, hidden: int, iters: int, gap_ms: float, q: Any) -> None:
    torch.set_num_threads(1)
    td = datetime.timedelta(seconds=60)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=td)
    send, recv, close = _ends(kind, rank, store, hidden)
    a = torch.randn(128, 128)

    def one() -> float:
        """Rank 0: send, receive the reply, compute; rank 1: receive, compute, reply.  The
        seconds spent computing."""
        if rank == 0:
            send()
            recv()
            return _busy(gap_ms, a) if gap_ms else 0.0
        recv()
        busy = _busy(gap_ms, a) if gap_ms else 0.0
        send()
        return busy

    for _ in range(20):
        one()
    times, busy = [], []
    cpu0 = time.process_time()
    for _ in range(iters):
        t0 = time.perf_counter()
        busy.append(one())
        times.append(time.perf_counter() - t0)
    q.put((rank, times, busy, time.process_time() - cpu0))
    close()
    store.set(f"done/{rank}", "1")
    store.wait([f"done/{1 - rank}"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hop_costs(hidden: int, iters: int = 500, gap_ms: float = 0.0) -> dict[str, Any]:
    """Median and 10th-percentile one-way hop (ms) of each kind, between two processes; with
    ``gap_ms``, each side computes that long before sending on (see module docstring)."""
    ctx = mp.get_context("spawn")
    out: dict[str, Any] = {"hidden": hidden, "iters": iters, "bytes": hidden * 4, "gap_ms": gap_ms}
    for kind in KINDS:
        q = ctx.Queue()
        port = _free_port()
        args = (port, kind, hidden, iters, gap_ms, q)
        procs = [ctx.Process(target=_peer, args=(r, *args)) for r in (0, 1)]
        for p in procs:
            p.start()
        got = sorted(q.get(timeout=600) for _ in procs)
        for p in procs:
            p.join(timeout=30)
        (_, t0, b0, _), (_, _, b1, _) = got
        # rank 0's round trip: two hops, rank 1's compute and (before it sends again) its own
        times = sorted(t - x - y for t, x, y in zip(t0, b0, b1, strict=True))
        r = out[kind] = {
            "hop_ms": statistics.median(times) / 2 * 1e3,
            "hop_p10_ms": times[len(times) // 10] / 2 * 1e3,
        }
        if not gap_ms:  # (computing, both processes' CPU time is mostly the compute's)
            r["cpu_per_hop_ms"] = sum(c for *_, c in got) / (2 * iters) * 1e3
        cpu = r.get("cpu_per_hop_ms")
        print(
            f"[hop] {kind}{f' after {gap_ms:g} ms computing' if gap_ms else ''}: "
            f"{r['hop_ms']:.3f} ms one way (median), p10 {r['hop_p10_ms']:.3f}"
            + (f", CPU {cpu:.3f} ms a hop (both processes)" if cpu is not None else ""),
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--gap-ms", type=float, default=0.0, help="compute between hops (ms)")
    args = ap.parse_args()
    print(json.dumps(hop_costs(args.hidden, args.iters, args.gap_ms), indent=2))


if __name__ == "__main__":
    main()
