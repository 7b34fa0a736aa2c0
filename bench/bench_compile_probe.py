"""Does a compiled decode step win on this CPU?  (issue 23, item 3: the measurement first)

    python -m bench.bench_compile_probe [--rows 1,32] [--new 32]

One process, one torch thread, the ``bench_generate`` model (random 134M Llama, fp32): HF
``generate`` per-token time with its dynamic cache (eager, as the pipeline's stages run today)
against ``generate`` with a static, preallocated cache (``cache_implementation="static"``)
eager, and with the forward compiled by ``torch.compile`` (Inductor on CPU; transformers' own
compiled-decode path, which runs on CPU only when ``CompileConfig._compile_all_devices`` is
set), at batch 1 and at 32 rows.  Greedy tokens must be equal (fp32).  Compile
time is the first compiled call's extra time.  Writes ``bench/results/compile_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.bench_generate import _prompt, build
from bench.harness import jsonable, machine

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def _gen(model: Any, ids: torch.Tensor, new: int, mode: str) -> tuple[float, torch.Tensor]:
    kw: dict[str, Any] = {}
    if mode != "eager":
        kw["cache_implementation"] = "static"
    if mode == "compiled":  # transformers compiles only on CUDA unless told to
        from transformers import CompileConfig

        cc = CompileConfig(fullgraph=False, dynamic=False)
        cc._compile_all_devices = True
        kw["compile_config"] = cc
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=0,
            **kw,
        )
    return time.perf_counter() - t0, out[:, ids.shape[1] :]


def probe(model: Any, rows: int, new: int) -> dict[str, Any]:
    ids = torch.tensor([_prompt(16, 50 + r) for r in range(rows)])
    res: dict[str, Any] = {"rows": rows, "new_tokens": new}
    for name in ("eager", "static", "compiled"):
        t_first, _ = _gen(model, ids, new + 1, name)  # compiles / warms up
        t1, _ = _gen(model, ids, 1, name)
        tn, toks = _gen(model, ids, new + 1, name)
        res[name] = {"ms_per_token": (tn - t1) / new * 1e3, "first_call_s": t_first, "tokens": toks}
        print(f"[probe] {rows} rows, {name}: {res[name]['ms_per_token']:.2f} ms/token", flush=True)
    res["compile_s"] = res["compiled"]["first_call_s"] - res["eager"]["first_call_s"]
    res["speedup"] = res["eager"]["ms_per_token"] / res["compiled"]["ms_per_token"]
    ref = res["eager"].pop("tokens")
    res["tokens_equal"] = all(
        torch.equal(ref, res[k].pop("tokens")) for k in ("static", "compiled")
    )
    res["load"] = os.getloadavg()[0]
    return res


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "# Compiled decode probe (HF generate, one process, one thread)",
        "",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']}, "
        f"transformers {m['transformers']}.  16-token prompts, {res['runs'][0]['new_tokens']} "
        f"new tokens (per token: (N+1 tokens - 1 token) / N).  Date: {res['date']}.  Command: "
        f"`python -m bench.bench_compile_probe --new {res['runs'][0]['new_tokens']}`.",
        "",
        "| rows | eager, dynamic cache | static cache | static + torch.compile | compiled vs "
        "eager | compile time | greedy tokens equal | 1-min load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        lines.append(
            f"| {r['rows']} | {r['eager']['ms_per_token']:.1f} ms | "
            f"{r['static']['ms_per_token']:.1f} ms | {r['compiled']['ms_per_token']:.1f} ms | "
            f"{r['speedup']:.2f}x | {r['compile_s']:.0f} s | {r['tokens_equal']} | "
            f"{r['load']:.1f} |"
        )
    return "\n".join([*lines, ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,32")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.report_only:
        res = json.loads((Path(args.out) / "compile_probe.json").read_text())
        (Path(args.out) / "compile_probe.md").write_text(markdown(res))
        return
    torch.set_num_threads(1)
    res: dict[str, Any] = {"machine": machine(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench_probe_") as d:
        model, _ = build(Path(d) / "llama")
        for rows in (int(x) for x in args.rows.split(",")):
            res["runs"].append(probe(model, rows, args.new))
    res["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_probe.json").write_text(json.dumps(jsonable(res), indent=2) + "\n")
    (out / "compile_probe.md").write_text(markdown(res))
    print(json.dumps(jsonable(res["runs"]), indent=2))


if __name__ == "__main__":
    main()
