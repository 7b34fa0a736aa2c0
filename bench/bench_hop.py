"""The cost of one hop between two generation stages on this host (issue 23).

Two processes, one thread each, send a decode step's message back and forth; the one-way hop is
half the round trip; the CPU time both processes spend (every thread: the receiving one, gloo's)
per hop is reported too -- on a shared machine the wall-clock median moves with the other load
(a woken process waits for a core), the CPU time much less.  Three layers, each on top of the
one before:

* ``gloo``: one ``send``/``recv`` of a tensor of the activation's size on a two-rank gloo group;
* ``channel``: :class:`~pipeline_core.transport.Channel` with a decode step's message (one gloo
  message: header and payload in one frame);
* ``ring``: :class:`~pipeline_core.ring.Ring` (the channel, plus the receiving thread and the
  queue that hands the message to the stage's loop) -- what a pipeline step pays per stage.

    python -m bench.bench_hop --hidden 768
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


def _peer(rank: int, port: int, kind: str, hidden: int, iters: int, q: Any) -> None:
    torch.set_num_threads(1)
    td = datetime.timedelta(seconds=60)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=td)
    other = 1 - rank
    if kind == "ring":
        from pipeline_core.ring import Ring

        ring = Ring(store, rank, 2, "cpu", 60.0)
        msg = _message(hidden)

        def one() -> None:
            if rank == 0:
                ring.send(msg)
                ring.recv()
            else:
                ring.send(ring.recv())

    else:
        pg = dist.ProcessGroupGloo(store, rank, 2, td)
        if kind == "gloo":
            buf = torch.randn(hidden)

            def one() -> None:
                if rank == 0:
                    pg.send([buf], other, 0).wait()
                    pg.recv([buf], other, 0).wait()
                else:
                    pg.recv([buf], other, 0).wait()
                    pg.send([buf], other, 0).wait()

        else:
            from pipeline_core.ring_messages import encode
            from pipeline_core.transport import Channel

            ch = Channel(pg)
            msg = encode(_message(hidden))

            def one() -> None:
                if rank == 0:
                    ch.send(msg, other)
                    ch.flush()
                    ch.recv(other)
                else:
                    got = ch.recv(other)
                    ch.send(got, other)
                    ch.flush()

    for _ in range(20):
        one()
    times = []
    cpu0 = time.process_time()
    for _ in range(iters):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    q.put((rank, times, time.process_time() - cpu0))
    if kind == "ring":  # STOP ends each side's receiving thread
        from pipeline_core.ring_messages import Stop

        if rank == 0:
            ring.send(Stop())
            ring.recv()
        else:
            ring.send(ring.recv())
    store.set(f"done/{rank}", "1")
    store.wait([f"done/{other}"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hop_costs(hidden: int, iters: int = 500) -> dict[str, Any]:
    """Median and 10th-percentile one-way hop (ms) of each kind, between two processes."""
    ctx = mp.get_context("spawn")
    out: dict[str, Any] = {"hidden": hidden, "iters": iters, "bytes": hidden * 4}
    for kind in KINDS:
        q = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_peer, args=(r, port, kind, hidden, iters, q)) for r in (0, 1)]
        for p in procs:
            p.start()
        got = sorted(q.get(timeout=300) for _ in procs)
        for p in procs:
            p.join(timeout=30)
        times = sorted(got[0][1])
        out[kind] = {
            "hop_ms": statistics.median(times) / 2 * 1e3,
            "hop_p10_ms": times[len(times) // 10] / 2 * 1e3,
            "cpu_per_hop_ms": sum(cpu for _r, _t, cpu in got) / (2 * iters) * 1e3,
        }
        r = out[kind]
        print(
            f"[hop] {kind}: {r['hop_ms']:.3f} ms one way (median), p10 {r['hop_p10_ms']:.3f}, "
            f"CPU {r['cpu_per_hop_ms']:.3f} ms a hop (both processes)",
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--iters", type=int, default=500)
    args = ap.parse_args()
    print(json.dumps(hop_costs(args.hidden, args.iters), indent=2))


if __name__ == "__main__":
    main()
