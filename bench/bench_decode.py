"""Decode overhead (issue 23): where a batch-1 decode step's time goes, per stage.

    python -m bench.bench_decode            # full: 1, 2, 4 stages, 3 draws x 3 rounds of 64 tokens
    python -m bench.bench_decode --short    # 2 rounds of 32 tokens (a few minutes)
    python -m bench.bench_decode --rounds 7 # more rounds: this VM's speed drifts 5-10%
    python -m bench.bench_decode --draws 5  # more fresh allocations per side (see latency())

The model and the fairness rules are ``bench_generate``'s: the random 134M Llama (hidden 768,
12 layers, fp32), a 16-token prompt, per-token time ``(time for N+1 new tokens - time for 1)
/ N`` for both, and **one torch thread in every computing process**: HF ``generate`` runs in
one process on one thread; the pipeline runs S processes of one thread each, but at batch 1
only one of them computes at any moment (the others wait in a blocking receive), so both sides
have one thread computing.  HF ``generate`` runs in the same rounds, interleaved with the
pipeline's (after it in even rounds, before it in odd ones), so each ratio comes from one run
under the same load (the 1-minute load average is
recorded beside each figure: this machine is shared).

With step timing on (``StageOptions(step_timing=True)``, which ``LocalGenerator`` passes to
every stage it spawns; the CLI and workers take it from ``PIPESERVE_STEP_TIMING=1``) every stage
reports where its time per decode step goes (:mod:`pipeline_core.step_timing`): compute inside
its own units, its own Python (the model's code outside the units, hooks, passthroughs, cache
bookkeeping), sampling, send, receive-wait and stage 0's scheduler; HF ``generate`` is split the
same way (compute inside the same units vs everything else).  The hop between two stages is
measured alone by :mod:`bench.bench_hop`.

Writes ``bench/results/decode.json`` and ``decode.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.bench_generate import _hf_generate_s, _prompt, build
from bench.bench_hop import hop_costs
from bench.decode_report import markdown
from bench.harness import code_state, machine, write_results
from pipeline_core import LocalGenerator, ModelSource, Policy, SamplingParams, make_plan
from pipeline_core.host_arena import HostArena, arena_bytes
from pipeline_core.stage_options import StageOptions
from pipeline_core.step_timing import CATEGORIES, TIMING_FIELDS, breakdown

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HOP_GAP_MS = 20.0
"""Compute between hops in the hop measured as the pipeline meets it (a later stage's share
of a token here is ~15-35 ms)."""


def load() -> float:
    return os.getloadavg()[0]


def _units(model: Any) -> list[torch.nn.Module]:
    inner = model.model
    return [inner.embed_tokens, *inner.layers, inner.norm, model.lm_head]


class _UnitClock:
    """Seconds spent inside ``modules`` (forward pre-hook to forward hook; they do not nest)."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.s = 0.0
        self._t0 = 0.0
        self._handles = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))

    def _pre(self, *_: Any) -> None:
        self._t0 = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self.s += time.perf_counter() - self._t0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _hf_round(model: Any, prompt: list[int], new: int, clock: _UnitClock) -> dict[str, float]:
    c0 = clock.s
    one = _hf_generate_s(model, prompt, 1)
    c1 = clock.s
    many = _hf_generate_s(model, prompt, new + 1)
    c2 = clock.s
    per = (many - one) / new
    compute = ((c2 - c1) - (c1 - c0)) / new
    return {"s_per_token": per, "compute_ms": compute * 1e3, "python_ms": (per - compute) * 1e3}


def _ours_round(gen: LocalGenerator, prompt: list[int], new: int) -> dict[str, Any]:
    s0 = gen.stats()
    t0 = time.perf_counter()
    gen.generate([prompt], SamplingParams(max_new_tokens=1, ignore_eos=True))
    t1 = time.perf_counter()
    s1 = gen.stats()
    gen.generate([prompt], SamplingParams(max_new_tokens=new + 1, ignore_eos=True))
    t2 = time.perf_counter()
    s2 = gen.stats()
    stages = []
    for a, b, c in zip(s0, s1, s2, strict=True):
        d1 = {k: b[k] - a[k] for k in TIMING_FIELDS}
        dn = {k: c[k] - b[k] for k in TIMING_FIELDS}
        stages.append(breakdown(d1, dn, steps=new))
    return {"s_per_token": ((t2 - t1) - (t1 - t0)) / new, "stages": stages}


def _median_stages(rounds: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    keys = [*CATEGORIES, "total", "compute_cpu"]
    return [
        {k: statistics.median(r[i][k] for r in rounds) for k in keys} for i in range(len(rounds[0]))
    ]


def in_huge_pages(model: Any) -> Any:
    """A copy of ``model`` with its parameters in one huge-page region, as a stage keeps its
    weights (:mod:`pipeline_core.host_arena`): HF ``generate`` on the same memory layout."""
    model = copy.deepcopy(model)
    params = {id(p): p for p in model.parameters()}  # tied: once
    arena = HostArena(arena_bytes(p.numel() * p.element_size() for p in params.values()))
    placed = {
        k: torch.nn.Parameter(arena.place(p.data), requires_grad=False) for k, p in params.items()
    }
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                mod._parameters[name] = placed[id(p)]
    arena.release()
    return model


def interleaved_round(
    i: int, runs: dict[str, Callable[[], Any]], got: dict[str, list[Any]]
) -> None:
    """Round ``i`` of every side in ``runs``, each result appended to ``got[side]``: in order
    in even rounds, reversed in odd ones, so a machine speeding up or slowing down over a round
    favours no side in the paired ratios' median."""
    for side in list(runs) if i % 2 == 0 else list(runs)[::-1]:
        got[side].append(runs[side]())


def _sides(
    model: Any,
    plan: Any,
    prompt: list[int],
    new: int,
    draw: int,
    stack: ExitStack,
    pipelines: dict[str, StageOptions] | None = None,
    in_process: frozenset[str] = frozenset(),
) -> dict[str, Callable[[], Any]]:
    """One draw of memory: fresh pipelines of ``plan`` (``pipelines``: name -> options; default
    one, ``ours``, timed; those named in ``in_process``: every stage a thread of this process)
    and fresh copies of HF's model (``hf``: its ordinary pages, as ``from_pretrained`` gives;
    ``hf_huge``: huge pages), warmed up; the pipelines allocate first in even draws, HF in odd
    ones, so neither side always gets later memory."""
    pipelines = pipelines or {"ours": StageOptions(step_timing=True)}
    gens: dict[str, LocalGenerator] = {}
    hf: list[Any] = []
    for side in ("ours", "hf") if draw % 2 == 0 else ("hf", "ours"):
        if side == "ours":
            for name, opts in pipelines.items():
                gen = LocalGenerator(plan, options=opts, in_process=name in in_process)
                gens[name] = stack.enter_context(gen)
                gens[name].generate([prompt], SamplingParams(max_new_tokens=4, ignore_eos=True))
        else:
            hf = [copy.deepcopy(model), in_huge_pages(model)]
    runs: dict[str, Callable[[], Any]] = {
        name: partial(_ours_round, gen, prompt, new) for name, gen in gens.items()
    }
    for side, m in zip(("hf", "hf_huge"), hf, strict=True):
        clock = _UnitClock(_units(m))
        stack.callback(clock.remove)
        _hf_generate_s(m, prompt, 4)
        runs[side] = partial(_hf_round, m, prompt, new, clock)
    return runs


def _draws_of(got: dict[str, list[Any]], side: str) -> list[list[Any]]:
    """``side``'s results of each draw, in draw order (``got`` is keyed ``side/draw``)."""
    return [rs for k, rs in got.items() if k.split("/")[0] == side]


def _by_draw(got: dict[str, list[Any]], side: str, key: Callable[[Any], float]) -> list[float]:
    """The median of ``key`` over each draw's results of ``side``."""
    return [statistics.median(map(key, rs)) for rs in _draws_of(got, side)]


THREADS = frozenset({"threads"})
"""The sides whose stages run as threads of this process (:class:`~pipeline_core.
local_generate.InProcessRing`): the same stage loop and step code, no address space per stage."""


def _pipelines(n: int) -> dict[str, StageOptions]:
    """The pipelines of ``n`` stages each draw builds: the stage processes (the goal's side)
    and, split, the same stages as threads of one process (the reference that separates what
    S processes alternating on this machine's cores cost from what the stages' code costs)."""
    sides = {"ours": StageOptions(step_timing=True)}
    if n > 1:
        sides["threads"] = StageOptions(step_timing=True)
    return sides


def _pooled(got: dict[str, list[Any]], side: str) -> list[Any]:
    """``side``'s results of every draw, in one list."""
    return [r for rs in _draws_of(got, side) for r in rs]


def _side_figures(ours: list[Any], hf: list[Any], hfh: list[Any]) -> dict[str, Any]:
    """A pipeline side's pooled figures against HF's (``hf``) and HF in huge pages (``hfh``),
    paired round by round."""
    o = statistics.median(r["s_per_token"] for r in ours)

    def paired(base: list[Any]) -> list[float]:
        return [a["s_per_token"] / b["s_per_token"] for a, b in zip(ours, base, strict=True)]

    return {
        "ms": o * 1e3,
        "ratio": o / statistics.median(r["s_per_token"] for r in hf),
        "ratios": paired(hf),
        "ratio_huge": o / statistics.median(r["s_per_token"] for r in hfh),
        "ratios_huge": paired(hfh),
        "stages": _median_stages([r["stages"] for r in ours]),
    }


def latency(
    model: Any, ckpt: Path, stages: list[int], new: int, rounds: int, draws: int = 1
) -> dict[str, Any]:
    """Per-token time and per-stage breakdown of each stage count, HF interleaved: HF
    ``generate`` as it runs (the goal's baseline) and on its weights moved into huge pages.

    [Note: draws of memory] on this VM the same weights stream at speeds up to ~13% apart
    depending on the memory they landed in (six huge-page copies of one model in one process,
    interleaved: 64-73 ms of compute per token; 256 MB huge-page chunks allocated one after
    another: 0.88x-1.45x a reference chunk, each steady over a run).  A pipeline's stages and
    HF's model each draw their memory once, so one draw per side made the ratio partly a
    lottery (two pipelines of one plan, interleaved: 65 vs 83 ms of compute per token).  So
    each side runs on ``draws`` fresh allocations -- pipelines and HF copies -- all kept alive
    and interleaved in every round."""
    prompt = _prompt(16, 2)
    out: dict[str, Any] = {}
    for n in stages:
        plan = make_plan(ModelSource(checkpoint=str(ckpt)), Policy.equal_size(n), trace=False)
        loads = []
        with ExitStack() as stack:
            runs: dict[str, Callable[[], Any]] = {}
            for d in range(draws):
                sides = _sides(model, plan, prompt, new, d, stack, _pipelines(n), THREADS)
                runs |= {f"{side}/{d}": run for side, run in sides.items()}
            got: dict[str, list[Any]] = {k: [] for k in runs}
            for i in range(rounds):
                loads.append(load())
                interleaved_round(i, runs, got)
            del runs  # the HF copies go now, not when the next stage count's draws are made

        ours, hf, hfh, threads = (
            _pooled(got, side) for side in ("ours", "hf", "hf_huge", "threads")
        )
        h = statistics.median(r["s_per_token"] for r in hf)
        hh = statistics.median(r["s_per_token"] for r in hfh)
        fig = _side_figures(ours, hf, hfh)
        out[n] = {
            "split": plan.split_points,
            "ours_ms": fig.pop("ms"),
            "hf_ms": h * 1e3,
            "hf_huge_ms": hh * 1e3,
            **fig,
            "hf_compute_ms": statistics.median(r["compute_ms"] for r in hf),
            "hf_python_ms": statistics.median(r["python_ms"] for r in hf),
            "hf_huge_compute_ms": statistics.median(r["compute_ms"] for r in hfh),
            "hf_huge_python_ms": statistics.median(r["python_ms"] for r in hfh),
            "load": [ld for _ in range(draws) for ld in loads],
            **({"threads": _side_figures(threads, hf, hfh)} if threads else {}),
            "draw_compute_ms": {
                "ours": _by_draw(got, "ours", lambda r: sum(st["compute"] for st in r["stages"])),
                "hf": _by_draw(got, "hf", lambda r: r["compute_ms"]),
                "hf_huge": _by_draw(got, "hf_huge", lambda r: r["compute_ms"]),
            },
        }
        print(
            f"[latency] {n} stage(s): {out[n]['ours_ms']:.2f} ms/token vs HF {h * 1e3:.2f}: "
            f"{fig['ratio']:.3f}x; vs HF in huge pages {hh * 1e3:.2f}: {fig['ratio_huge']:.3f}x "
            f"(load {loads}); compute by draw {out[n]['draw_compute_ms']}",
            flush=True,
        )
        for i, st in enumerate(out[n]["stages"]):
            print(f"    stage {i}: " + ", ".join(f"{k} {v:.2f}" for k, v in st.items()))
        if "threads" in out[n]:
            t = out[n]["threads"]
            print(f"    as threads: {t['ms']:.2f} ms/token, {t['ratio']:.3f}x HF", flush=True)
    return out


def bench(
    tmp: Path, short: bool, stages: list[int], rounds: int | None, draws: int | None
) -> dict[str, Any]:
    model, ckpt = build(tmp / "llama")
    res: dict[str, Any] = {"hidden": model.config.hidden_size}
    res["params"] = sum(p.numel() for p in model.parameters())
    new, default, default_draws = (32, 2, 1) if short else (64, 3, 3)
    rounds, draws = rounds or default, draws or default_draws
    res["new_tokens"], res["rounds"], res["draws"] = new, rounds, draws
    res["hop"] = hop_costs(model.config.hidden_size, 200 if short else 500) | {"load": load()}
    res["hop_gap"] = hop_costs(model.config.hidden_size, 60 if short else 150, gap_ms=HOP_GAP_MS)
    res["latency"] = latency(model, ckpt, stages, new, rounds, draws)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS), help="results directory")
    ap.add_argument("--short", action="store_true", help="2 rounds of 32 tokens")
    ap.add_argument("--stages", default="1,2,4", help="stage counts (comma-separated)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3; --short 2)")
    ap.add_argument(
        "--draws", type=int, default=None, help="fresh allocations per side (default 3; --short 1)"
    )
    ap.add_argument("--name", default="decode", help="results file stem")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report_only:
        res = json.loads((out / f"{args.name}.json").read_text())
        (out / f"{args.name}.md").write_text(markdown(res))
        return
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"machine": machine(), "code": code_state(), "short": args.short}
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as d:
        stages = [int(x) for x in args.stages.split(",")]
        res.update(bench(Path(d), args.short, stages, args.rounds, args.draws))
    res["total_s"] = time.perf_counter() - t0
    res["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(write_results(out, args.name, res, markdown))


if __name__ == "__main__":
    main()
