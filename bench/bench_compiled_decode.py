"""Compiled decode step vs eager, through the real stage path (issue 23, item 3).

    python -m bench.bench_compiled_decode [--rows 1,32] [--new 32] [--stages 1] [--rounds 2]

The ``bench_generate`` model (random 134M Llama, fp32) on ``--stages`` in-process generation
stages (:class:`~pipeline_core.local_generate.LocalGenerator`, one torch thread), once eager
and once with ``StageOptions(compile_decode=...)`` (:mod:`pipeline_core.compiled_step`: each
owned decoder layer compiled by Inductor on a bucketed static KV cache).  Per-token time at
each row count is ``(time of N+1 tokens - time of 1 token) / N`` (the prefill cancels), the
best of ``--rounds`` rounds run alternately; compile time is what the stages logged per
bucket (Inductor's on-disk cache is a fresh temporary directory: cold).  Greedy tokens of the
two must be equal (fp32).  Writes ``bench/results/compiled_decode.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.bench_generate import _prompt, build
from bench.harness import machine, write_results
from pipeline_core import ModelSource, Policy, make_plan
from pipeline_core.compiled_step import CompileSettings
from pipeline_core.local_generate import LocalGenerator
from pipeline_core.sampling import SamplingParams
from pipeline_core.stage_options import StageOptions

RESULTS = Path(__file__).resolve().parent / "results"
STEM = "compiled_decode"


def _timed(gen: LocalGenerator, prompts: list[list[int]], new: int) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = gen.generate(prompts, SamplingParams(max_new_tokens=new, ignore_eos=True))
    return time.perf_counter() - t0, out


def _per_token(gen: LocalGenerator, prompts: list[list[int]], new: int) -> tuple[float, Any]:
    t1, _ = _timed(gen, prompts, 1)
    tn, toks = _timed(gen, prompts, new + 1)
    return (tn - t1) / new, toks


def _stages(gen: LocalGenerator) -> list[Any]:
    eng = gen._engine()
    return [eng.stage, *getattr(eng.ring, "stages", [])]


def run(ckpt: Path, rows: list[int], new: int, stages: int, rounds: int) -> dict[str, Any]:
    plan = make_plan(ModelSource(checkpoint=str(ckpt)), Policy.equal_size(stages), trace=False)
    settings = CompileSettings()
    opts = {"eager": StageOptions(), "compiled": StageOptions(compile_decode=settings)}
    res: dict[str, Any] = {"stages": stages, "new_tokens": new, "rounds": rounds, "runs": []}
    gens = {k: LocalGenerator(plan, in_process=True, options=o) for k, o in opts.items()}
    try:
        for n in rows:
            prompts = [_prompt(16, 50 + r) for r in range(n)]
            r: dict[str, Any] = {"rows": n, "load": []}
            first: dict[str, float] = {}
            for name, gen in gens.items():  # warm-up; compiles this bucket
                first[name], _ = _timed(gen, prompts, new + 1)
            times: dict[str, list[float]] = {k: [] for k in gens}
            toks: dict[str, Any] = {}
            for _ in range(rounds):
                r["load"].append(os.getloadavg()[0])
                for name, gen in gens.items():
                    s, toks[name] = _per_token(gen, prompts, new)
                    times[name].append(s)
                    print(f"[compiled_decode] {n} rows, {name}: {s * 1e3:.1f} ms/token", flush=True)
            for name in gens:
                r[name] = {"ms_per_token": min(times[name]) * 1e3, "all_ms": times[name]}
            r["speedup"] = r["eager"]["ms_per_token"] / r["compiled"]["ms_per_token"]
            r["tokens_equal"] = toks["eager"] == toks["compiled"]
            r["first_call_extra_s"] = first["compiled"] - first["eager"]
            res["runs"].append(r)
        st = _stages(gens["compiled"])
        res["compile_s"] = {
            f"stage {s.index}: {k[0]} {k[1]} rows x {k[2]} tokens": v
            for s in st
            if s.compiled is not None
            for k, v in s.compiled.compile_s.items()
        }
        res["graphs"] = len({k for s in st if s.compiled for k in s.compiled.compile_s})
        res["fell_back"] = [s.compiled.off for s in st if s.compiled and s.compiled.off]
    finally:
        for gen in gens.values():
            gen.close()
    return res


def _ratios(r: dict[str, Any]) -> list[float]:
    """Eager / compiled time of each round (the two ran back to back in it)."""
    return [e / c for e, c in zip(r["eager"]["all_ms"], r["compiled"]["all_ms"], strict=True)]


def _median_ratio(r: dict[str, Any]) -> float:
    return statistics.median(_ratios(r))


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    new = res["new_tokens"]
    lines = [
        "# Compiled decode step vs eager (the stage path)",
        "",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']}, "
        f"transformers {m['transformers']}.  Model: the `bench_generate` random Llama (134M, "
        f"fp32) on {res['stages']} in-process stage(s), one torch thread; 16-token prompts, "
        f"{new} new tokens (per token: (N+1 tokens - 1 token) / N, best of {res['rounds']} "
        f"alternating rounds).  Compiled: `StageOptions(compile_decode=CompileSettings())`, "
        "each decoder layer a `torch.compile` (Inductor, fullgraph) call on a bucketed static "
        f"KV cache; everything else eager.  Date: {res['date']}.  Command: "
        f"`python -m bench.bench_compiled_decode --new {new}`.",
        "",
        "| metric | goal | measured | baseline | ratio | |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        lines.append(
            f"| greedy tokens, compiled vs eager, {r['rows']} row(s) | equal | "
            f"{'equal' if r['tokens_equal'] else 'differ'} | eager | - | "
            f"{'PASS' if r['tokens_equal'] else 'FAIL'} |"
        )
    for r in res["runs"]:
        word = "faster" if r["speedup"] >= 1 else "the speed (slower)"
        lines.append(
            f"| per-token time, compiled, {r['rows']} row(s) (best round each) | (measured) | "
            f"{r['compiled']['ms_per_token']:.1f} ms | {r['eager']['ms_per_token']:.1f} ms "
            f"(eager) | {r['speedup']:.2f}x {word} | n/a |"
        )
        lines.append(
            f"| eager / compiled per round, {r['rows']} row(s) (median) | (measured) | "
            f"{_median_ratio(r):.2f}x | "
            + ", ".join(f"{x:.2f}x" for x in _ratios(r))
            + " | - | n/a |"
        )
    nb = res["graphs"]
    lines += [
        f"| graphs compiled (buckets met) | <= buckets | {nb} | {len(res['runs'])} buckets "
        f"| - | {'PASS' if nb <= len(res['runs']) else 'FAIL'} |",
        "",
        "## Compile time (logged once per bucket by the stage; a cold Inductor cache)",
        "",
        "| bucket | compile time |",
        "|---|---|",
        *(f"| {k} | {v:.1f} s |" for k, v in res["compile_s"].items()),
        "",
        "1-minute load average at each round's start: "
        + "; ".join(
            f"{r['rows']} row(s): " + ", ".join(f"{x:.1f}" for x in r["load"]) for r in res["runs"]
        )
        + ".  All rounds (ms/token, eager / compiled): "
        + "; ".join(
            f"{r['rows']} row(s): "
            + ", ".join(f"{e * 1e3:.1f}" for e in r["eager"]["all_ms"])
            + " / "
            + ", ".join(f"{c * 1e3:.1f}" for c in r["compiled"]["all_ms"])
            for r in res["runs"]
        )
        + (f".  Fell back to eager: {res['fell_back']}" if res["fell_back"] else "")
        + ".",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,32")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report_only:
        res = json.loads((out / f"{STEM}.json").read_text())
        (out / f"{STEM}.md").write_text(markdown(res))
        return
    torch.set_num_threads(1)
    rows = [int(x) for x in args.rows.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_compiled_") as d:
        # a cold Inductor cache: compile times as a fresh worker pays them
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(d) / "inductor")
        model, ckpt = build(Path(d) / "llama")
        del model  # the stages load their own copy
        res = run(ckpt, rows, args.new, args.stages, args.rounds)
    res["machine"] = machine()
    res["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(write_results(out, STEM, res, markdown))


if __name__ == "__main__":
    main()
