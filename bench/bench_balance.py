"""Benchmark ``Policy.balanced`` (split by time) against a split by bytes, GPipe and one process.

Run from the repository root::

    python -m bench.bench_balance

Writes ``bench/results/balance.json`` (every number) and ``bench/results/balance.md`` (a table
of metric, goal, measured, baseline, ratio and pass/fail, plus the machine).  Every process that
computes runs with ``torch.set_num_threads(1)``; the run takes about 2-3 minutes on 2 cores.
``--report-only`` rewrites ``balance.md`` from an existing ``balance.json``.

A random Llama (hidden 640, 12 layers, intermediate 1728, 10 heads, vocab 32000, untied head,
fp32, ~96M parameters) is saved with ``max_shard_size="100MB"`` and run, batch 8 x 128 tokens
in 4 microbatches, by

* **single process**: the whole model in one process, 1 thread (baseline A);
* **GPipe**: ``torch.distributed.pipelining`` ``ScheduleGPipe``, 2 ranks, split at the middle
  layer ``model.layers.6`` (baseline B; ``bench.baselines.gpipe_rank``);
* **ours, equal_size(2)** (info) and **ours, balanced(2)** (the goal rows): ``LocalPipeline``
  (2 processes, the driver hosts the last stage), batches streamed with ``pipe.imap``.

Contestants alternate over rounds (rotating order) and the medians are reported.  Both plans
are made for the benchmark's workload (batch 8 x 128, 4 microbatches, 1 thread): every unit's
time is *profiled* by the planner (``pipeline_core.cost``: one unit of each kind on random
weights, in this process, before any pipeline starts), and the plan's predicted per-stage time
is compared with what ``LocalPipeline.stage_times()`` measured.
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

from bench.balance_report import GPIPE_SPLIT, markdown, table
from bench.baselines import (
    BATCH,
    CHUNKS,
    SEQ,
    Workers,
    eager_worker,
    gpipe_rank,
    parallel_matmul_check,
    time_ours_stream,
)
from bench.harness import (
    code_state,
    free_port,
    machine,
    proc_status,
    spawn_and_get,
    write_results,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MiB = 2**20

LLAMA = dict(
    hidden_size=640,
    num_hidden_layers=12,
    num_attention_heads=10,
    num_key_value_heads=10,
    intermediate_size=1728,
    vocab_size=32000,
    tie_word_embeddings=False,
)
SHARD_SIZE = "100MB"
WARMUP, ITERS, ROUNDS = 1, 3, 5


def build_checkpoint_child(path: str, q: Any) -> None:
    """Save the random Llama (in a child, so this process's memory stays small)."""
    torch.set_num_threads(1)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=SHARD_SIZE)
    shards = sorted(Path(path).glob("*.safetensors"))
    q.put(
        {
            "config": LLAMA,
            "dtype": "float32",
            "params": params,
            "param_bytes": params * 4,
            "shard_size": SHARD_SIZE,
            "shards": {p.name: p.stat().st_size for p in shards},
        }
    )


def bench_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, LLAMA["vocab_size"], (BATCH, SEQ), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _plan_summary(plan: Any) -> dict[str, Any]:
    return {
        "policy": plan.policy.describe(),
        "split_points": plan.split_points,
        "stage_units": [[s.units[0], s.units[-1], len(s.units)] for s in plan.stages],
        "stage_bytes": [s.nbytes for s in plan.stages],
        "stage_flops": [s.flops for s in plan.stages],
        "stage_seconds": [s.seconds for s in plan.stages],
        "estimate": plan.estimate,
        "workload": plan.workload,
        "units": plan.units,
        "example_inputs": [{"name": i.name, "shape": list(i.shape)} for i in plan.inputs],
    }


def bench(tmp: Path) -> dict[str, Any]:
    from pipeline_core import LocalPipeline, ModelSource, Policy, Workload, make_plan

    ckpt = tmp / "llama-96m"
    t0 = time.perf_counter()
    model_info = spawn_and_get(build_checkpoint_child, (str(ckpt),))
    print(
        f"[model] {model_info['params'] / 1e6:.1f}M params, {model_info['param_bytes'] / MiB:.0f}"
        f" MiB in {len(model_info['shards'])} shards ({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    source = ModelSource(checkpoint=str(ckpt))
    plans, plan_s = {}, {}
    workload = Workload(batch=BATCH, seq=SEQ, chunks=CHUNKS, threads=1)
    with tempfile.TemporaryDirectory(prefix="profiles_") as cache:
        fresh = Path(cache) / "unit-profiles.json"
        for name, policy in (
            ("balanced", Policy.balanced(2)),  # first: it pays for the profile
            ("equal_size", Policy.equal_size(2)),
        ):
            t0 = time.perf_counter()
            plans[name] = make_plan(source, policy, workload=workload, profile_cache=fresh)
            plan_s[name] = time.perf_counter() - t0
            p = plans[name]
            print(
                f"[plan] {p.policy.describe()}: split at {p.split_points}, stage MiB "
                f"{[round(s.nbytes / MiB, 1) for s in p.stages]}, predicted ms per microbatch "
                f"{[round(s.seconds * 1e3, 1) for s in p.stages]} ({plan_s[name]:.1f} s)",
                flush=True,
            )

    inputs = bench_inputs()
    names = ["ours_balanced", "ours_equal_size", "gpipe", "single_process"]
    rounds: dict[str, list[float]] = {k: [] for k in names}
    last_compute: dict[str, list[float]] = {k: [] for k in names}
    tails: dict[str, torch.Tensor] = {}
    pipes: dict[str, Any] = {}
    start_s: dict[str, float] = {}
    stage_info: dict[str, Any] = {}
    gpipe = eager = None
    try:
        for name in ("balanced", "equal_size"):
            t0 = time.perf_counter()
            pipes[name] = LocalPipeline(plans[name], threads_per_stage=1)
            start_s[f"ours_{name}"] = time.perf_counter() - t0
            stage_info[f"ours_{name}"] = [dict(i) for i in pipes[name].stage_info]
        t0 = time.perf_counter()
        port = free_port()
        gpipe = Workers(
            "ScheduleGPipe",
            [(gpipe_rank, (r, port, str(ckpt), GPIPE_SPLIT, inputs)) for r in range(2)],
        )
        start_s["gpipe"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        eager = Workers("single-process", [(eager_worker, (str(ckpt), inputs))])
        start_s["single_process"] = time.perf_counter() - t0
        print(f"[start] seconds until ready: {start_s}", flush=True)
        contestants = {
            "ours_balanced": lambda n: time_ours_stream(pipes["balanced"], inputs, n),
            "ours_equal_size": lambda n: time_ours_stream(pipes["equal_size"], inputs, n),
            "gpipe": gpipe.run,
            "single_process": eager.run,
        }
        for fn in contestants.values():
            fn(WARMUP)
        for r in range(ROUNDS):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                run = contestants[name](ITERS)
                tails[name] = run.tail
                rounds[name].append(ITERS * BATCH / run.elapsed_s)
                if run.last_stage_compute_s is not None:
                    last_compute[name].append(run.last_stage_compute_s / ITERS)
            print(
                f"[throughput] round {r}: "
                + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rounds.items())
                + " samples/s",
                flush=True,
            )
        driver_status = proc_status()
    finally:
        for w in (gpipe, eager):
            if w is not None:
                w.close()
        for pipe in pipes.values():
            pipe.close()
    stage_times = {f"ours_{n}": p.stage_times() for n, p in pipes.items()}

    med = {k: statistics.median(v) for k, v in rounds.items()}
    spb = {k: BATCH / v for k, v in med.items()}
    res: dict[str, Any] = {
        "model": model_info,
        "plan_s": plan_s,
        "plans": {n: _plan_summary(p) for n, p in plans.items()},
        "gpipe_split": GPIPE_SPLIT,
        "start_s": start_s,
        "stage_info": stage_info,
        "stage_times": stage_times,
        "driver_status_end": driver_status,
        "throughput": {
            "batch": BATCH,
            "seq": SEQ,
            "chunks": CHUNKS,
            "threads_per_process": 1,
            "warmup": WARMUP,
            "iters_per_round": ITERS,
            "rounds": ROUNDS,
            "samples_per_s_by_round": rounds,
            "samples_per_s_median": med,
            "s_per_batch_median": spb,
            "last_stage_compute_s_per_batch_by_round": last_compute,
            "last_stage_compute_s_per_batch_median": {
                k: statistics.median(v) for k, v in last_compute.items() if v
            },
            "ratio_balanced_single": med["ours_balanced"] / med["single_process"],
            "ratio_balanced_gpipe": med["ours_balanced"] / med["gpipe"],
            "ratio_equal_single": med["ours_equal_size"] / med["single_process"],
            "ratio_equal_gpipe": med["ours_equal_size"] / med["gpipe"],
            "ratio_balanced_equal": med["ours_balanced"] / med["ours_equal_size"],
            "max_abs_diff_vs_single": {
                k: (tails[k] - tails["single_process"]).abs().max().item()
                for k in names
                if k != "single_process"
            },
        },
    }
    res["prediction"] = {n: predict(res, n) for n in ("balanced", "equal_size")}
    return res


def predict(res: dict[str, Any], name: str) -> dict[str, Any]:
    """Per-stage compute seconds per microbatch: the plan's prediction (profiled unit times,
    summed per stage) vs what ``stage_times()`` measured while the pipeline ran."""
    plan = res["plans"][name]
    stages = []
    for k, (predicted, t) in enumerate(
        zip(plan["stage_seconds"], res["stage_times"][f"ours_{name}"], strict=True)
    ):
        measured = t["compute_s"] / t["microbatches"]
        stages.append(
            {
                "stage": k,
                "predicted_s_per_mb": predicted,
                "measured_s_per_mb": measured,
                "error": predicted / measured - 1,
            }
        )
    tp = res["throughput"]
    measured_sps = tp["samples_per_s_median"][f"ours_{name}"]
    streaming = plan["estimate"]["streaming_samples_per_s"]
    return {
        "stages": stages,
        "max_abs_error": max(abs(s["error"]) for s in stages),
        "predicted_streaming_samples_per_s": streaming,
        "measured_samples_per_s": measured_sps,
        "throughput_error": streaming / measured_sps - 1,
    }


# ---------------------------------------------------------------------------------------------
# report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS), help="results directory")
    ap.add_argument(
        "--report-only", action="store_true", help="rewrite balance.md from balance.json"
    )
    args = ap.parse_args()
    out = Path(args.out)
    if args.report_only:
        (out / "balance.md").write_text(markdown(json.loads((out / "balance.json").read_text())))
        print(f"wrote {out / 'balance.md'}")
        return
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"machine": machine(), "code": code_state()}
    res["parallel_matmul"] = parallel_matmul_check()
    print(f"[machine] {res['machine']['cpu']}; parallel matmul {res['parallel_matmul']}")
    with tempfile.TemporaryDirectory(prefix="bench_balance_") as d:
        res.update(bench(Path(d)))
    res["total_s"] = time.perf_counter() - t0
    res["code_changed_during_run"] = code_state()["sha256"] != res["code"]["sha256"]
    res["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    res["pid"] = os.getpid()
    write_results(out, "balance", res, markdown)
    print(f"wrote {out / 'balance.json'} and {out / 'balance.md'} ({res['total_s']:.0f} s)")
    for r in table(res):
        print(" | ".join(r))


if __name__ == "__main__":
    main()
