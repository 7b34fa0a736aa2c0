"""What alternating decode between processes costs on this machine, with no pipeline code.

    python -m bench.bench_alternation [--stages 2,4] [--rounds 8] [--tokens 64]

The ``bench_generate`` model's 12 decoder layers (transformers' own ``LlamaDecoderLayer``,
hidden 768, fp32, weights in huge pages as a stage keeps them, a ``DynamicCache``) decode one
token at a time from an empty cache, laid out three ways, interleaved in every round:

* one thread running all 12 layers back to back (what HF ``generate`` does);
* k processes, each running 12/k layers, handing the hidden state on through
  ``multiprocessing`` pipes -- a pipeline reduced to the bare hand-over (this process feeds
  the first and reads the last: k+1 hops a token, where a ring of stages has k);
* k threads of one process, the same hand-over through queues (no address-space switch);
* k processes as above, all bound to one core (the feeding process left free): a hand-over
  never leaves a core idle or moves a process, so what remains of the per-layer cost above
  the one thread's is neither a vCPU waking from halt nor a move between cores.

Layer i has the same weights in every layout, and every layout must end with the same hidden
state as the one thread, bitwise (the goal rows: the layouts do the same work).  Each layout
times its own layers (per-layer compute) beside the per-token wall time.  The
per-layer figures above the one-thread row are what alternation itself costs here -- the floor
under ``bench_decode``'s stage compute, which no change to the stages' code can remove.
Writes ``bench/results/alternation.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.bench_decode import in_huge_pages
from bench.bench_generate import CONFIG
from bench.harness import machine, write_results

RESULTS = Path(__file__).resolve().parent / "results"
STEM = "alternation"
LAYERS = CONFIG["num_hidden_layers"]
HIDDEN = CONFIG["hidden_size"]


class Part:
    """Decoder layers ``lo..hi-1`` of the bench model with their own KV cache."""

    def __init__(self, lo: int, hi: int) -> None:
        from transformers import DynamicCache, LlamaConfig
        from transformers.models.llama.modeling_llama import (
            LlamaDecoderLayer,
            LlamaRotaryEmbedding,
        )

        self.cfg = LlamaConfig(**CONFIG)
        self.cfg._attn_implementation = "sdpa"
        layers = torch.nn.ModuleList()
        for i in range(lo, hi):  # layer i has the same weights in every layout
            torch.manual_seed(i)
            layers.append(LlamaDecoderLayer(self.cfg, i))
        self.layers = list(in_huge_pages(layers.eval()))
        self.rope = LlamaRotaryEmbedding(self.cfg)
        self.new_cache = lambda: DynamicCache(config=self.cfg)
        self.compute_s, self.steps = 0.0, 0
        self.reset()

    def reset(self) -> None:
        self.cache, self.pos = self.new_cache(), 0

    @torch.no_grad()
    def step(self, h: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        pos = torch.tensor([[self.pos]])
        emb = self.rope(h, pos)
        for layer in self.layers:
            h = layer(h, position_ids=pos, past_key_values=self.cache, position_embeddings=emb)
            h = h[0] if isinstance(h, tuple) else h
        self.pos += 1
        self.compute_s += time.perf_counter() - t0
        self.steps += 1
        return h

    def per_layer_ms(self) -> float:
        """Compute per layer since the last call (the counters start again from zero)."""
        ms = self.compute_s / self.steps / len(self.layers) * 1e3
        self.compute_s, self.steps = 0.0, 0
        return ms


def _serve_process(lo: int, hi: int, rx: Any, tx: Any, core: int | None) -> None:
    torch.set_num_threads(1)
    if core is not None:
        os.sched_setaffinity(0, {core})
    part = Part(lo, hi)
    while True:
        b = rx.recv_bytes()
        if b == b"reset":
            part.reset()
            tx.send_bytes(b)
        elif b.startswith(b"report"):  # each process adds its figure and passes it on
            tx.send_bytes(b + f" {part.per_layer_ms()}".encode())
        elif b == b"quit":
            tx.send_bytes(b)
            return
        else:
            h = torch.frombuffer(bytearray(b), dtype=torch.float32).view(1, 1, HIDDEN)
            tx.send_bytes(part.step(h).numpy().tobytes())


class Processes:
    """k processes on a ring of pipes; this process only feeds the first and reads the last.
    ``core``: every one of them bound to that core."""

    def __init__(self, k: int, core: int | None = None) -> None:
        ctx = mp.get_context("spawn")
        per = LAYERS // k
        pipes = [ctx.Pipe(duplex=False) for _ in range(k + 1)]  # (receive end, send end)
        self.procs = [
            ctx.Process(
                target=_serve_process,
                args=(i * per, (i + 1) * per, pipes[i][0], pipes[i + 1][1], core),
            )
            for i in range(k)
        ]
        for p in self.procs:
            p.start()
        self.tx, self.rx = pipes[0][1], pipes[k][0]

    def _through(self, b: bytes) -> bytes:
        self.tx.send_bytes(b)
        return self.rx.recv_bytes()

    def run(self, tokens: int, h: torch.Tensor) -> torch.Tensor:
        self._through(b"reset")
        b = h.numpy().tobytes()
        for _ in range(tokens):
            b = self._through(b)
        return torch.frombuffer(bytearray(b), dtype=torch.float32).view(1, 1, HIDDEN)

    def per_layer_ms(self) -> list[float]:
        return [float(x) for x in self._through(b"report").split()[1:]]

    def close(self) -> None:
        self._through(b"quit")
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()


class Threads:
    """k threads of this process on a ring of queues."""

    def __init__(self, k: int) -> None:
        per = LAYERS // k
        self.parts = [Part(i * per, (i + 1) * per) for i in range(k)]
        self.qs: list[queue.SimpleQueue[Any]] = [queue.SimpleQueue() for _ in range(k + 1)]
        for i in range(k):
            threading.Thread(target=self._serve, args=(i,), daemon=True).start()

    def _serve(self, i: int) -> None:
        torch.set_num_threads(1)
        while (h := self.qs[i].get()) is not None:
            if isinstance(h, str):
                self.parts[i].reset()
            else:
                h = self.parts[i].step(h)
            self.qs[i + 1].put(h)
        self.qs[i + 1].put(None)  # the next thread ends too

    def run(self, tokens: int, h: torch.Tensor) -> torch.Tensor:
        self.qs[0].put("reset")
        self.qs[-1].get()
        for _ in range(tokens):
            self.qs[0].put(h)
            h = self.qs[-1].get()
        return h

    def per_layer_ms(self) -> list[float]:
        return [p.per_layer_ms() for p in self.parts]

    def close(self) -> None:
        self.qs[0].put(None)


class OneThread:
    def __init__(self) -> None:
        self.part = Part(0, LAYERS)

    def run(self, tokens: int, h: torch.Tensor) -> torch.Tensor:
        self.part.reset()
        for _ in range(tokens):
            h = self.part.step(h)
        return h

    def per_layer_ms(self) -> list[float]:
        return [self.part.per_layer_ms()]

    def close(self) -> None:
        pass


def run(stages: list[int], rounds: int, tokens: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    layouts: dict[str, Any] = {"one thread": OneThread()}
    cores = sorted(os.sched_getaffinity(0))
    for k in stages:
        layouts[f"{k} processes"] = Processes(k)
        layouts[f"{k} threads"] = Threads(k)
        if len(cores) > 1:  # one core of several: the others stay free for the feeding process
            layouts[f"{k} processes, one core"] = Processes(k, core=cores[-1])
    h = torch.randn(1, 1, HIDDEN, generator=torch.Generator().manual_seed(0)) * 0.1
    ms: dict[str, list[float]] = {name: [] for name in layouts}
    out: dict[str, torch.Tensor] = {}
    load = []
    try:
        for lay in layouts.values():  # warm-up (and the processes' start), not counted
            lay.run(8, h)
            lay.per_layer_ms()
        for r in range(rounds):
            load.append(os.getloadavg()[0])
            for name in list(layouts) if r % 2 == 0 else list(layouts)[::-1]:
                t0 = time.perf_counter()
                out[name] = layouts[name].run(tokens, h)
                ms[name].append((time.perf_counter() - t0) / tokens * 1e3)
        per_layer = {name: lay.per_layer_ms() for name, lay in layouts.items()}
    finally:
        for lay in layouts.values():
            lay.close()
    base = ms["one thread"]
    return {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "tokens": tokens,
        "rounds": rounds,
        "load": load,
        "equal": {name: bool(torch.equal(t, out["one thread"])) for name, t in out.items()},
        "layouts": {
            name: {
                "ms_per_token": statistics.median(v),
                "paired": statistics.median(a / b for a, b in zip(v, base, strict=True)),
                "all_ms": v,
                "layer_ms": per_layer[name],
            }
            for name, v in ms.items()
        },
    }


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lay = res["layouts"]
    one = lay["one thread"]["layer_ms"][0]
    lines = [
        "# Alternation: the same decoder layers in one thread, k processes, k threads",
        "",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']}, transformers "
        f"{m['transformers']}.  The `bench_generate` model's {LAYERS} Llama decoder layers "
        f"(hidden {HIDDEN}, fp32, huge pages, `DynamicCache`), {res['tokens']} tokens from an "
        f"empty cache, one torch thread everywhere; no pipeline code: the hidden state goes "
        "through `multiprocessing` pipes (processes) or queues (threads).  Median of "
        f"{res['rounds']} interleaved rounds.  Date: {res['date']}.  Command: "
        "`python -m bench.bench_alternation`.",
        "",
        "| metric | goal | measured | baseline | ratio | |",
        "|---|---|---|---|---|---|",
    ]
    for name, eq in res["equal"].items():
        if name != "one thread":
            lines.append(
                f"| final hidden state after {res['tokens']} tokens, {name} | equal | "
                f"{'equal' if eq else 'differs'} | one thread | - | {'PASS' if eq else 'FAIL'} |"
            )
    for name, r in lay.items():
        if name == "one thread":
            continue
        per = statistics.mean(r["layer_ms"])
        lines.append(
            f"| per-layer compute, {name} (mean of theirs) | (measured) | {per:.3f} ms | "
            f"{one:.3f} ms (one thread) | {per / one:.3f}x | n/a |"
        )
    for name, r in lay.items():
        if name != "one thread":
            lines.append(
                f"| per token, {name} (paired median) | (measured) | {r['ms_per_token']:.2f} ms"
                f" | {lay['one thread']['ms_per_token']:.2f} ms (one thread) | "
                f"{r['paired']:.3f}x | n/a |"
            )
    loads = ", ".join(f"{x:.1f}" for x in res["load"])
    lines += [
        "",
        "Per-layer compute is each layout's own time inside its layers, so the hand-over "
        "(pipe or queue, the wake-up of the next process or thread) is not in it: what it "
        "shows above 1 is the same layers executing slower when decode alternates between "
        "processes or threads instead of running back to back in one -- the floor under "
        "`bench_decode`'s stage compute on this machine.  `one core`: the k processes bound "
        "to one core, so that a hand-over between them never idles a core or moves a process.  "
        "Per layer, each process or thread: "
        + "; ".join(f"{n}: " + ", ".join(f"{x:.3f}" for x in r["layer_ms"]) for n, r in lay.items())
        + f" ms.  1-minute load average at each round's start: {loads}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="2,4", help="process/thread counts (comma-separated)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report_only:
        print(markdown(json.loads((out / f"{STEM}.json").read_text())))
        return
    res = run([int(k) for k in args.stages.split(",")], args.rounds, args.tokens)
    print(write_results(out, STEM, res, markdown))


if __name__ == "__main__":
    main()
