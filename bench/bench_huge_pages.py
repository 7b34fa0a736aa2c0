"""Stage weights in huge pages vs ordinary pages (issue 23; :mod:`pipeline_core.host_arena`).

    python -m bench.bench_huge_pages             # 2 and 4 stages, 3 draws x 3 rounds of 64 tokens
    python -m bench.bench_huge_pages --draws 1 --rounds 3 --stages 2

Two pipelines of the same plan run side by side, one loading its stages' weights into one
huge-page region (the default), one with ``StageOptions(huge_pages=False)`` (each tensor in
its own allocation, as before); HF ``generate`` runs in the same rounds twice, on its own
weights and on a copy moved into huge pages.  All four are interleaved in every round (the
order reverses every other round), so drift of this VM's speed over minutes cancels in the
paired ratios.  Every side is allocated afresh on each of ``--draws`` draws (on this VM the
same weights stream up to ~13% apart with the memory they land in), rounds pooled.  The model
and rules are ``bench_decode``'s: random 134M Llama, fp32, a 16-token prompt,
``(time for N+1 new tokens - time for 1) / N``, one torch thread per process.

Writes ``bench/results/huge_pages.json`` and ``huge_pages.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from bench.bench_decode import _sides, interleaved_round, load
from bench.bench_generate import _prompt, build
from bench.harness import code_state, machine, write_results
from pipeline_core import ModelSource, Policy, make_plan
from pipeline_core.stage_options import StageOptions

RESULTS = Path(__file__).resolve().parent / "results"
SIDES = ("huge", "hf", "plain", "hf_huge")
PIPELINES = {
    "huge": StageOptions(step_timing=True),
    "plain": StageOptions(step_timing=True, huge_pages=False),
}
"""The two pipelines of one plan each draw makes (``bench_decode._sides`` adds HF's two)."""
GOAL = 1.0
"""The default layout must not be slower than the one it replaced."""


def _compute(r: dict[str, Any]) -> float:
    return sum(st["compute"] for st in r["stages"]) if "stages" in r else r["compute_ms"]


def compare(
    ckpt: Path, model: Any, stages: int, new: int, rounds: int, draws: int
) -> dict[str, Any]:
    prompt = _prompt(16, 2)
    plan = make_plan(ModelSource(checkpoint=str(ckpt)), Policy.equal_size(stages), trace=False)
    got: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
    loads = []
    for d in range(draws):
        with ExitStack() as stack:
            sides = _sides(model, plan, prompt, new, d, stack, PIPELINES)
            runs = {side: sides[side] for side in SIDES}
            for i in range(rounds):
                loads.append(load())
                interleaved_round(i, runs, got)

    def paired(a: str, b: str) -> float:
        return statistics.median(
            x["s_per_token"] / y["s_per_token"] for x, y in zip(got[a], got[b], strict=True)
        )

    out = {
        side: {
            "ms": statistics.median(r["s_per_token"] for r in got[side]) * 1e3,
            "compute_ms": statistics.median(_compute(r) for r in got[side]),
        }
        for side in SIDES
    }
    out["stages_huge_vs_plain"] = paired("huge", "plain")
    out["hf_huge_vs_plain"] = paired("hf_huge", "hf")
    out["stages_huge_vs_hf"] = paired("huge", "hf")
    out["stages_plain_vs_hf"] = paired("plain", "hf")
    out["load"] = loads
    print(f"[huge pages] {stages} stage(s): {out}", flush=True)
    return out


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    rows = []
    for n, r in sorted((int(k), v) for k, v in res["stages"].items()):
        rows += [
            f"| per token, {n} stage(s): weights in huge pages vs ordinary pages (paired) | "
            f"<= {GOAL}x | {r['huge']['ms']:.2f} ms | {r['plain']['ms']:.2f} ms | "
            f"{r['stages_huge_vs_plain']:.3f}x | "
            + ("PASS" if r["stages_huge_vs_plain"] <= GOAL else "FAIL")
            + " |",
            f"| the same stages' compute (inside their units) | (reference) | "
            f"{r['huge']['compute_ms']:.2f} ms | {r['plain']['compute_ms']:.2f} ms | "
            f"{r['huge']['compute_ms'] / r['plain']['compute_ms']:.3f}x | |",
            f"| per token, HF `generate` in the same rounds: weights moved into huge pages vs "
            f"its own | (reference) | {r['hf_huge']['ms']:.2f} ms | {r['hf']['ms']:.2f} ms | "
            f"{r['hf_huge_vs_plain']:.3f}x | |",
            f"| per token, {n} stage(s) vs HF `generate` (huge pages / ordinary pages) | "
            f"(reference) | {r['huge']['ms']:.2f} / {r['plain']['ms']:.2f} ms | "
            f"{r['hf']['ms']:.2f} ms | {r['stages_huge_vs_hf']:.3f}x / "
            f"{r['stages_plain_vs_hf']:.3f}x | |",
        ]
    loads = "; ".join(
        f"{k} stage(s): " + ", ".join(f"{x:.1f}" for x in v["load"])
        for k, v in sorted(res["stages"].items())
    )
    return "\n".join(
        [
            "# Stage weights in huge pages",
            "",
            f"Machine: {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']}.  "
            f"Random Llama, 134M parameters, fp32; 16-token prompt, {res['new_tokens']} new "
            f"tokens; medians of {res['rounds']} rounds on each of {res.get('draws', 1)} "
            "draw(s) of memory (fresh pipelines and fresh HF copies per draw, pooled), ratios "
            "paired per round.  Two "
            "pipelines of the same plan (`StageOptions(huge_pages=True)`, the default, and "
            "`huge_pages=False`) and HF `generate` on its own weights and on a copy moved into "
            "huge pages, all four interleaved in every round.  Date: "
            f"{res['date']}.  Command: `python -m bench.bench_huge_pages`.",
            "",
            "| metric | goal | measured | baseline | ratio | |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"1-minute load average at each round's start: {loads}.  Kernel THP mode: "
            f"`{res['thp']}`.",
            "",
        ]
    )


def _thp_mode() -> str:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--stages", default="2,4")
    ap.add_argument("--rounds", type=int, default=3, help="rounds on each draw")
    ap.add_argument("--draws", type=int, default=3, help="fresh allocations of every side")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--report-only", action="store_true", help="markdown from the JSON")
    args = ap.parse_args()
    if args.report_only:
        res = json.loads((Path(args.out) / "huge_pages.json").read_text())
        (Path(args.out) / "huge_pages.md").write_text(markdown(res))
        return
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"machine": machine(), "code": code_state(), "thp": _thp_mode()}
    res.update(rounds=args.rounds, draws=args.draws, new_tokens=args.new, stages={})
    with tempfile.TemporaryDirectory() as d:
        model, ckpt = build(Path(d) / "llama")
        for n in (int(x) for x in args.stages.split(",")):
            res["stages"][n] = compare(ckpt, model, n, args.new, args.rounds, args.draws)
    res["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    res["wall_s"] = time.perf_counter() - t0
    print(write_results(Path(args.out), "huge_pages", res, markdown))


if __name__ == "__main__":
    main()
