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
  the one thread's is neither a vCPU waking from halt nor a move between cores;
* k processes forked from this one, running the one thread's own layer objects: the very
  weight pages the one thread reads, so what remains is not the memory the weights landed in;
* where there are k cores: k processes, one bound to each core, on a ring of pipes that the
  first drives itself, each spinning for its message -- no process ever sleeps and no core
  ever switches between them, so what remains is not the scheduler's work either.

Layer i has the same weights in every layout, and every layout must end with the same hidden
state as the one thread, bitwise (the goal rows: the layouts do the same work).  Each layout
times its own layers (per-layer compute, also by the layer's place in its process's or
thread's turn) beside the per-token wall time.  The
per-layer figures above the one-thread row are what alternation itself costs here -- the floor
under ``bench_decode``'s stage compute, which no change to the stages' code can remove.
Writes ``bench/results/alternation.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
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
        self._clear()
        self.reset()

    def view(self, lo: int, hi: int) -> Part:
        """Layers ``lo..hi-1`` of this part (the same layer objects, so the same weight
        memory) with a cache and counters of their own."""
        part = copy.copy(self)
        part.layers = self.layers[lo:hi]
        part._clear()
        part.reset()
        return part

    def _clear(self) -> None:
        """The timing counters back to zero."""
        self.compute_s, self.steps, self.layer_s = 0.0, 0, [0.0] * len(self.layers)

    def reset(self) -> None:
        self.cache, self.pos = self.new_cache(), 0

    @torch.no_grad()
    def step(self, h: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        pos = torch.tensor([[self.pos]])
        emb = self.rope(h, pos)
        for j, layer in enumerate(self.layers):
            t1 = time.perf_counter()
            h = layer(h, position_ids=pos, past_key_values=self.cache, position_embeddings=emb)
            h = h[0] if isinstance(h, tuple) else h
            self.layer_s[j] += time.perf_counter() - t1
        self.pos += 1
        self.compute_s += time.perf_counter() - t0
        self.steps += 1
        return h

    def per_layer_ms(self) -> list[float]:
        """Since the last call (the counters start again from zero): the step's compute per
        layer, then each layer's own time in turn order (the first ran right after the
        hand-over)."""
        ms = [self.compute_s / self.steps / len(self.layers) * 1e3]
        ms += [s / self.steps * 1e3 for s in self.layer_s]
        self._clear()
        return ms


def _encode(ms: list[float]) -> str:
    return ",".join(f"{x:.6f}" for x in ms)


def _decode(b: bytes) -> list[list[float]]:
    return [[float(x) for x in part.split(b",")] for part in b.split()[1:]]


def _hidden(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.float32).view(1, 1, HIDDEN)


def _bytes(h: torch.Tensor) -> bytes:
    return h.numpy().tobytes()


def _end(procs: list[Any]) -> None:
    """Wait for processes told to stop; kill one that does not."""
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()


def _serve_process(
    lo: int, hi: int, rx: Any, tx: Any, core: int | None, whole: Part | None = None
) -> None:
    """One process of a ring: layers ``lo..hi-1``, its own (``whole`` None: spawned) or
    ``whole``'s (forked from the process that built it)."""
    torch.set_num_threads(1)
    if core is not None:
        os.sched_setaffinity(0, {core})
    part = Part(lo, hi) if whole is None else whole.view(lo, hi)
    while True:
        b = rx.recv_bytes()
        if b == b"reset":
            part.reset()
            tx.send_bytes(b)
        elif b.startswith(b"report"):  # each process adds its figures and passes them on
            tx.send_bytes(b + f" {_encode(part.per_layer_ms())}".encode())
        elif b == b"quit":
            tx.send_bytes(b)
            return
        else:
            tx.send_bytes(_bytes(part.step(_hidden(b))))


class Processes:
    """k processes on a ring of pipes; this process only feeds the first and reads the last.
    ``core``: every one of them bound to that core; ``whole``: forked, each running its layers
    of that part (the same layer objects and weight memory), not spawned with its own."""

    def __init__(self, k: int, core: int | None = None, whole: Part | None = None) -> None:
        ctx = mp.get_context("spawn" if whole is None else "fork")
        per = LAYERS // k
        pipes = [ctx.Pipe(duplex=False) for _ in range(k + 1)]  # (receive end, send end)
        self.procs = [
            ctx.Process(
                target=_serve_process,
                args=(i * per, (i + 1) * per, pipes[i][0], pipes[i + 1][1], core, whole),
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
        b = _bytes(h)
        for _ in range(tokens):
            b = self._through(b)
        return _hidden(b)

    def per_layer_ms(self) -> list[list[float]]:
        return _decode(self._through(b"report"))

    def close(self) -> None:
        self._through(b"quit")
        _end(self.procs)


def _serve_spinning(i: int, k: int, rx: Any, tx: Any, ctl: Any, core: int) -> None:
    """Process ``i`` of a ring of ``k``, bound to ``core``, spinning for each message; the
    first drives the tokens itself, so that nothing else runs on the ring's cores."""
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {core})
    per = LAYERS // k
    part = Part(i * per, (i + 1) * per)

    def receive() -> torch.Tensor:
        while not rx.poll():
            pass
        return _hidden(rx.recv_bytes())

    while (cmd := ctl.recv()) is not None:
        if cmd == "report":
            ctl.send(part.per_layer_ms())
            continue
        tokens, h = cmd
        part.reset()
        for t in range(tokens):
            if i > 0 or t > 0:  # the first's next input is the last one's output
                h = receive()
            h = part.step(h)
            if i < k - 1 or t < tokens - 1:
                tx.send_bytes(_bytes(h))
        ctl.send(h if i == k - 1 else None)


class Spinning:
    """k processes, process i bound to core i, on a ring of pipes; each spins for its
    message, the first takes the last one's output as its next token's input."""

    def __init__(self, k: int, cores: list[int]) -> None:
        ctx = mp.get_context("spawn")
        ring = [ctx.Pipe(duplex=False) for _ in range(k)]  # ring[i]: into process i
        self.ctl = [ctx.Pipe() for _ in range(k)]
        self.procs = [
            ctx.Process(
                target=_serve_spinning,
                args=(i, k, ring[i][0], ring[(i + 1) % k][1], self.ctl[i][1], cores[i]),
            )
            for i in range(k)
        ]
        for p in self.procs:
            p.start()

    def run(self, tokens: int, h: torch.Tensor) -> torch.Tensor:
        for i, (end, _) in enumerate(self.ctl):
            end.send((tokens, h if i == 0 else None))
        return [end.recv() for end, _ in self.ctl][-1]

    def per_layer_ms(self) -> list[list[float]]:
        for end, _ in self.ctl:
            end.send("report")
        return [end.recv() for end, _ in self.ctl]

    def close(self) -> None:
        for end, _ in self.ctl:
            end.send(None)
        _end(self.procs)


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

    def per_layer_ms(self) -> list[list[float]]:
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

    def per_layer_ms(self) -> list[list[float]]:
        return [self.part.per_layer_ms()]

    def close(self) -> None:
        pass


def run(stages: list[int], rounds: int, tokens: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    one = OneThread()
    layouts: dict[str, Any] = {"one thread": one}
    cores = sorted(os.sched_getaffinity(0))
    forked = {k: Processes(k, whole=one.part) for k in stages}  # before any thread starts
    for k in stages:
        layouts[f"{k} processes"] = Processes(k)
        layouts[f"{k} threads"] = Threads(k)
        if len(cores) > 1:  # one core of several: the others stay free for the feeding process
            layouts[f"{k} processes, one core"] = Processes(k, core=cores[-1])
        layouts[f"{k} processes, forked"] = forked[k]
        if 1 < k <= len(cores):
            layouts[f"{k} processes, a core each, spinning"] = Spinning(k, cores)
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
    one = lay["one thread"]["layer_ms"][0][0]
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
        per = _per_layer(r)
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
        "`forked`: the processes forked from the one thread's process, each running its "
        "layers of the one thread's own objects, so they read the very same weight pages.  "
        "`a core each, spinning`: process i bound to core i, the first driving the ring "
        "itself (k hops a token), each spinning for its message: no process sleeps and no "
        "core switches between processes.  "
        "Per layer, each process or thread: "
        + "; ".join(
            f"{n}: " + ", ".join(f"{x[0]:.3f}" for x in r["layer_ms"]) for n, r in lay.items()
        )
        + f" ms.  1-minute load average at each round's start: {loads}.",
        "",
        "## By place in the turn",
        "",
        "Each layer's time over the same layer's time in the one thread (same weights), for "
        "the first layer a process or thread runs after the hand-over and for the rest of its "
        "turn; the one thread's turn is the whole token.",
        "",
        "| layout | first layer of a turn | the turn's other layers | all layers |",
        "|---|---|---|---|",
    ]
    base = lay["one thread"]["layer_ms"][0][1:]
    for name, r in lay.items():
        if name != "one thread":
            first, rest = _turn_ratios([x[1:] for x in r["layer_ms"]], base)
            per = _per_layer(r) / one
            lines.append(f"| {name} | {first:.3f}x | {rest:.3f}x | {per:.3f}x |")
    return "\n".join([*lines, ""])


def _per_layer(r: dict[str, Any]) -> float:
    """A layout's compute per layer (ms), the mean over its processes or threads."""
    return statistics.mean(x[0] for x in r["layer_ms"])


def _turn_ratios(parts: list[list[float]], one: list[float]) -> tuple[float, float]:
    """Mean ratio to the one thread's same layer: of each part's first layer, of the others."""
    ratios, start = [], 0
    for ms in parts:
        ratios.append([x / one[start + j] for j, x in enumerate(ms)])
        start += len(ms)
    return (
        statistics.mean(r[0] for r in ratios),
        statistics.mean(x for r in ratios for x in r[1:]),
    )


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
