"""Benchmark pipeline_core: planning cost, per-stage loading memory, pipelined throughput.

Run from the repository root::

    python -m bench.bench_core

Writes ``bench/results/core.json`` (every number) and ``bench/results/core.md`` (a table of
metric, goal, measured, baseline, ratio and pass/fail, plus the machine).  Every process that
computes runs with ``torch.set_num_threads(1)``; the whole run takes about 2.5 minutes on 2 cores.
``--report-only`` rewrites ``core.md`` from an existing ``core.json``.

1. **Planning** a Llama-7B-shaped model (only ``config.json`` on disk) with
   ``make_plan(..., Policy.equal_size(4), trace=False)`` in a fresh subprocess: wall time and
   peak RSS.  Then the same with ``trace=True`` (``torch.export`` on fake tensors), given at
   most 120 s.
2. **Loading memory** of each stage of a ~230 MiB random Llama saved as 50 MB safetensors
   shards, split in 2: how much a stage's RSS grows from just before it reads its tensors
   until they are loaded (resident), relative to the bytes it reads -- from the real stages'
   ``LocalPipeline.stage_info`` (both layouts), plus a probe process per stage for the
   anonymous / file-backed split.
3. **Throughput** of ``LocalPipeline`` (2 stages, fill-drain, 4 microbatches; default layout,
   where the driver hosts the last stage, and ``host_last_stage=False``) against
   ``torch.distributed.pipelining``'s ``ScheduleGPipe`` on the same split of the same
   checkpoint (plus a single-process eager reference), measured in interleaved rounds, with
   the last stage's compute / wait / concatenation time and every process's CPU and page
   faults per batch.

Peaks are ``VmHWM`` from ``/proc`` (see :mod:`bench.harness`'s note).  The throughput part
lives in :mod:`bench.core_stages`, the report in :mod:`bench.core_report`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.baselines import TRACE_TIMEOUT_S, parallel_matmul_check
from bench.core_report import markdown
from bench.core_stages import bench_stages
from bench.harness import (
    RESULTS,
    ROOT,
    MiB,
    code_state,
    machine,
    proc_status,
    ru_maxrss,
    write_results,
)

LLAMA_7B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    intermediate_size=11008,
    vocab_size=32000,
)


def plan_child(ckpt: str, trace: bool) -> None:
    """Subprocess body: plan ``ckpt`` and print one JSON line with time and memory."""
    t_start = time.perf_counter()
    torch.set_num_threads(1)
    from pipeline_core import ModelSource, Policy, make_plan

    import_s = time.perf_counter() - t_start
    after_import = proc_status()
    t0 = time.perf_counter()
    plan = make_plan(ModelSource(checkpoint=ckpt), Policy.equal_size(4), trace=trace)
    plan_s = time.perf_counter() - t0
    end = proc_status()
    out = {
        "plan_s": plan_s,
        "import_s": import_s,
        "peak_rss_after_import": after_import["VmHWM"],
        "peak_rss": end["VmHWM"],
        "rss_end": end["VmRSS"],
        "ru_maxrss": ru_maxrss(),
        "split_points": plan.split_points,
        "stage_bytes": [s.nbytes for s in plan.stages],
        "total_bytes": plan.total_bytes,
        "wired": all(s.receives for s in plan.stages[1:]),
    }
    print("RESULT " + json.dumps(out), flush=True)


def run_plan_subprocess(ckpt: str, trace: bool, timeout: float | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.bench_core", "--plan-child", ckpt]
    if trace:
        cmd.append("--trace")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"status": "skipped", "reason": f"did not finish within {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"status": "failed", "returncode": proc.returncode, "stderr": proc.stderr[-3000:]}
    return {"status": "ok", "subprocess_wall_s": wall, **json.loads(lines[-1][len("RESULT ") :])}


def bench_plan(tmp: Path) -> dict[str, Any]:
    from transformers import LlamaConfig

    ckpt = tmp / "llama7b-config"
    LlamaConfig(**LLAMA_7B).save_pretrained(ckpt)
    files = sorted(p.name for p in ckpt.iterdir())
    print(f"[plan] Llama-7B shape, files on disk: {files}", flush=True)
    no_trace = run_plan_subprocess(str(ckpt), trace=False, timeout=600)
    print(f"[plan] trace=False: {_short(no_trace)}", flush=True)
    traced = run_plan_subprocess(str(ckpt), trace=True, timeout=TRACE_TIMEOUT_S)
    print(f"[plan] trace=True: {_short(traced)}", flush=True)
    return {
        "config": LLAMA_7B,
        "files": files,
        "parent_ru_maxrss": ru_maxrss(),
        "trace_false": no_trace,
        "trace_true": traced,
    }


def _short(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return json.dumps(r)[:500]
    return (
        f"plan {r['plan_s']:.2f} s (subprocess {r['subprocess_wall_s']:.1f} s), peak RSS "
        f"{r['peak_rss'] / MiB:.0f} MiB (after imports {r['peak_rss_after_import'] / MiB:.0f}, "
        f"ru_maxrss {r['ru_maxrss'] / MiB:.0f})"
    )


# ---------------------------------------------------------------------------------------------
# 2. per-stage loading memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan-child", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS), help="results directory")
    ap.add_argument(
        "--report-only", action="store_true", help="rewrite core.md from the existing core.json"
    )
    args = ap.parse_args()
    if args.plan_child:
        plan_child(args.plan_child, args.trace)
        return
    if args.report_only:
        out = Path(args.out)
        (out / "core.md").write_text(markdown(json.loads((out / "core.json").read_text())))
        print(f"wrote {out / 'core.md'}")
        return

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"machine": machine(), "code": code_state()}
    res["parallel_matmul"] = parallel_matmul_check()
    print(f"[machine] {res['machine']}; parallel matmul {res['parallel_matmul']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_core_") as d:
        tmp = Path(d)
        res["plan"] = bench_plan(tmp)
        res["stages"] = bench_stages(tmp)
    res["total_s"] = time.perf_counter() - t0
    res["code_changed_during_run"] = code_state()["sha256"] != res["code"]["sha256"]
    res["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    out = Path(args.out)
    write_results(out, "core", res, markdown)
    print(f"wrote {out / 'core.json'} and {out / 'core.md'} ({res['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
