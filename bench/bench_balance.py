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
  layer ``model.layers.6`` (baseline B; ``bench.bench_core.gpipe_rank``);
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

from bench.bench_core import (
    BATCH,
    CHUNKS,
    SEQ,
    Workers,
    _jsonable,
    _spawn_and_get,
    code_state,
    eager_worker,
    free_port,
    gpipe_rank,
    machine,
    parallel_matmul_check,
    proc_status,
    time_ours_stream,
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
GPIPE_SPLIT = "model.layers.6"
WARMUP, ITERS, ROUNDS = 1, 3, 5

GOAL_VS_SINGLE = 1.35
GOAL_VS_GPIPE = 1.2
GOAL_PRED_ERR = 0.20


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
    from pipeline_core.cost import PROFILE_CACHE_ENV

    ckpt = tmp / "llama-96m"
    t0 = time.perf_counter()
    model_info = _spawn_and_get(build_checkpoint_child, (str(ckpt),))
    print(
        f"[model] {model_info['params'] / 1e6:.1f}M params, {model_info['param_bytes'] / MiB:.0f}"
        f" MiB in {len(model_info['shards'])} shards ({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    source = ModelSource(checkpoint=str(ckpt))
    plans, plan_s = {}, {}
    workload = Workload(batch=BATCH, seq=SEQ, chunks=CHUNKS, threads=1)
    with tempfile.TemporaryDirectory(prefix="profiles_") as cache:
        os.environ[PROFILE_CACHE_ENV] = str(Path(cache) / "unit-profiles.json")  # fresh
        for name, policy in (
            ("balanced", Policy.balanced(2)),  # first: it pays for the profile
            ("equal_size", Policy.equal_size(2)),
        ):
            t0 = time.perf_counter()
            plans[name] = make_plan(source, policy, workload=workload)
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


def _pf(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _table(res: dict[str, Any]) -> list[tuple[str, ...]]:
    tp = res["throughput"]
    med, spb = tp["samples_per_s_median"], tp["s_per_batch_median"]
    bal, eq = res["plans"]["balanced"], res["plans"]["equal_size"]

    def sps(k: str) -> str:
        return f"{med[k]:.2f} samples/s ({spb[k]:.3f} s/batch)"

    def split(p: dict[str, Any]) -> str:
        return ", ".join(f"`{s}`" for s in p["split_points"])

    pr = res["prediction"]["balanced"]
    pre = res["prediction"]["equal_size"]
    pred_txt = " / ".join(
        f"stage {s['stage']}: {s['predicted_s_per_mb'] * 1e3:.1f} ms" for s in pr["stages"]
    )
    meas_txt = " / ".join(
        f"stage {s['stage']}: {s['measured_s_per_mb'] * 1e3:.1f} ms" for s in pr["stages"]
    )
    err_txt = " / ".join(f"{s['error']:+.1%}" for s in pr["stages"])
    rows = [
        (
            f"Pipelined forward, 2 stages x 1 thread, batch {BATCH}x{SEQ}, {CHUNKS} microbatches, "
            f"`pipe.imap` over batches: ours `balanced(2)` (split at {split(bal)}) vs one "
            "process, whole model, 1 thread",
            f">= {GOAL_VS_SINGLE}x",
            sps("ours_balanced"),
            f"single process {sps('single_process')}",
            f"{tp['ratio_balanced_single']:.3f}",
            _pf(tp["ratio_balanced_single"] >= GOAL_VS_SINGLE),
        ),
        (
            f"Same, ours `balanced(2)` vs `ScheduleGPipe` split at the middle (`{GPIPE_SPLIT}`)",
            f">= {GOAL_VS_GPIPE}x",
            sps("ours_balanced"),
            f"GPipe {sps('gpipe')}",
            f"{tp['ratio_balanced_gpipe']:.3f}",
            _pf(tp["ratio_balanced_gpipe"] >= GOAL_VS_GPIPE),
        ),
        (
            f"Same, ours `equal_size(2)` (split by bytes, at {split(eq)}) vs GPipe / vs single "
            "process",
            "info",
            sps("ours_equal_size"),
            f"GPipe {med['gpipe']:.2f} / single {med['single_process']:.2f} samples/s",
            f"{tp['ratio_equal_gpipe']:.3f} / {tp['ratio_equal_single']:.3f}",
            "n/a",
        ),
        (
            "`balanced(2)`: per-stage compute per microbatch predicted by the plan (unit times "
            "profiled by the planner) vs measured while the pipeline ran (`stage_times()`)",
            f"within {GOAL_PRED_ERR:.0%}",
            f"predicted {pred_txt}",
            f"measured {meas_txt}",
            err_txt,
            _pf(pr["max_abs_error"] <= GOAL_PRED_ERR),
        ),
        (
            "Same prediction for `equal_size(2)`",
            "info",
            " / ".join(f"{s['predicted_s_per_mb'] * 1e3:.1f} ms" for s in pre["stages"]),
            " / ".join(f"{s['measured_s_per_mb'] * 1e3:.1f} ms" for s in pre["stages"]),
            " / ".join(f"{s['error']:+.1%}" for s in pre["stages"]),
            "n/a",
        ),
        (
            "Predicted throughput (batches streamed: microbatch rows / slowest stage) vs "
            "measured: balanced / equal_size",
            "info",
            f"{pr['predicted_streaming_samples_per_s']:.2f} / "
            f"{pre['predicted_streaming_samples_per_s']:.2f} samples/s",
            f"{pr['measured_samples_per_s']:.2f} / {pre['measured_samples_per_s']:.2f} samples/s",
            f"{pr['throughput_error']:+.1%} / {pre['throughput_error']:+.1%}",
            "n/a",
        ),
        (
            "Same logits: max abs diff vs single process (last 4 positions): balanced / "
            "equal_size / GPipe",
            "info",
            " / ".join(
                f"{tp['max_abs_diff_vs_single'][k]:.2g}"
                for k in ("ours_balanced", "ours_equal_size", "gpipe")
            ),
            "-",
            "-",
            "n/a",
        ),
    ]
    return rows


def markdown(res: dict[str, Any]) -> str:
    m, tp, mi = res["machine"], res["throughput"], res["model"]
    pm = res["parallel_matmul"]
    lines = [
        "# pipeline_core benchmark: time-balanced split",
        "",
        f"Generated by `python -m bench.bench_balance` on {res['date']} in "
        f"{res['total_s']:.0f} s, pipeline_core at commit `{res['code']['commit']}`"
        + (
            f" with uncommitted changes in {res['code']['uncommitted']}"
            if res["code"]["uncommitted"]
            else ""
        )
        + ".",
        "",
        f"Machine: **{m['cpu']}**, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['memory_gib']} GiB RAM; torch {m['torch']}, transformers {m['transformers']}, "
        f"Python {m['python']} ({m['platform']}).  Every computing process uses "
        f"`torch.set_num_threads(1)`.  Two single-thread processes running one big matmul at "
        f"the same time each take {pm['slowdown']:.2f}x as long as one alone (1.00 = two "
        "independent cores; this shared VM is noisy).",
        "",
        "| metric | goal | measured | baseline | ratio | pass/fail |",
        "|---|---|---|---|---|---|",
        *("| " + " | ".join(r) + " |" for r in _table(res)),
        "",
        "## How it was measured",
        "",
    ]
    cfg = mi["config"]
    lines.append(
        f"**Model.** A random `LlamaForCausalLM` (hidden {cfg['hidden_size']}, "
        f"{cfg['num_hidden_layers']} layers, intermediate {cfg['intermediate_size']}, "
        f"{cfg['num_attention_heads']} heads, vocab {cfg['vocab_size']}, untied head, fp32, "
        f"{mi['params'] / 1e6:.1f}M parameters, {mi['param_bytes'] / MiB:.0f} MiB) saved with "
        f'`max_shard_size="{mi["shard_size"]}"` ({len(mi["shards"])} shards).'
    )
    lines.append("")
    plan_txt = []
    for n, p in res["plans"].items():
        plan_txt.append(
            f"`{p['policy']}` split at {', '.join(f'`{s}`' for s in p['split_points'])}: stages "
            + "; ".join(
                f"{a} .. {b} ({c} units, {nb / MiB:.1f} MiB, predicted {t * 1e3:.1f} ms per "
                "microbatch)"
                for (a, b, c), nb, t in zip(
                    p["stage_units"], p["stage_bytes"], p["stage_seconds"], strict=True
                )
            )
            + f" (`make_plan` {res['plan_s'][n]:.1f} s)"
        )
    units = res["plans"]["balanced"]["units"]
    unit_txt = ", ".join(f"{u['name']} {u['seconds'] * 1e3:.2f} ms ({u['cost']})" for u in units)
    lines.append(
        "**Plans.** " + ".  ".join(plan_txt) + ".  Unit times per microbatch "
        f"({BATCH // CHUNKS} x {SEQ} tokens, 1 thread), as the planner profiled them (one unit "
        f"of each kind on random weights; `balanced` planned first with an empty profile "
        f"cache, so its `make_plan` time includes the profiling): {unit_txt}."
    )
    lines.append("")
    by_round = "; ".join(
        f"{k}: {', '.join(f'{v:.2f}' for v in vals)}"
        for k, vals in tp["samples_per_s_by_round"].items()
    )
    lc = tp["last_stage_compute_s_per_batch_median"]
    lines.append(
        f"**Throughput.** Same checkpoint, batch {BATCH} x {SEQ} tokens (all-ones mask), "
        f"{CHUNKS} microbatches, 1 thread per process, all in one session: {tp['warmup']} "
        f"warm-up batch each, then {tp['rounds']} rounds of {tp['iters_per_round']} batches per "
        "contestant, rotating the order every round; medians over rounds.  Ours: "
        "`LocalPipeline(plan, threads_per_stage=1)` (stage 0 in its own process, the last "
        f"stage in this driver process), `pipe.imap([batch] * {tp['iters_per_round']}, "
        f"chunks={CHUNKS})`.  GPipe: `bench.bench_core.gpipe_rank` (2 gloo ranks, `pipeline()` "
        f"split at `{res['gpipe_split']}`, `ScheduleGPipe`, back-to-back `step()` calls).  "
        "Single process: `bench.bench_core.eager_worker` (whole model, full batch).  "
        f"samples/s per round: {by_round}.  Last stage's compute per batch (median over rounds): "
        + ", ".join(f"{k} {v:.3f} s" for k, v in lc.items())
        + ".  Start-up until ready: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in res["start_s"].items())
        + "."
    )
    lines.append("")
    m_cores, pm_slow = m["usable_cores"], pm["slowdown"]
    st_txt = "; ".join(
        f"{n}: "
        + ", ".join(
            f"stage {k} compute {t['compute_s']:.2f} s / wait {t['wait_s']:.2f} s over "
            f"{t['microbatches']} microbatches"
            for k, t in enumerate(ts)
        )
        for n, ts in res["stage_times"].items()
    )
    lines.append(
        "**Prediction.** Each stage's predicted time is the sum of its units' profiled times "
        "(`plan.stages[k].seconds`); measured = `stage_times()` compute / microbatches (totals "
        "over all runs, warm-up included).  The profile runs one unit alone in one process; "
        "in the pipeline both stages compute at the same time on the "
        f"{m_cores}-core VM (the matmul check above: {pm_slow:.2f}x slower when two run at "
        "once), which is most of the gap.  The predicted throughput assumes batches streamed "
        "back to back (`imap`), so the slowest stage sets the pace; transfers and the driver's "
        "merging of the outputs are not modelled.  Raw stage totals: "
        f"{st_txt}."
    )
    lines.append("")
    return "\n".join(lines)


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
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(res), indent=2) + "\n"
    (out / "balance.json").write_text(text)
    (out / "balance.md").write_text(markdown(json.loads(text)))
    print(f"wrote {out / 'balance.json'} and {out / 'balance.md'} ({res['total_s']:.0f} s)")
    for r in _table(res):
        print(" | ".join(r))


if __name__ == "__main__":
    main()
