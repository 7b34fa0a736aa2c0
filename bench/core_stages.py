"""The throughput part of ``bench_core``: ``LocalPipeline`` (both layouts) against GPipe and
a single process, in interleaved rounds, with per-process CPU and a bitwise module check.
Run through ``python -m bench.bench_core``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.baselines import (
    BATCH,
    CHUNKS,
    ITERS,
    MID_LLAMA,
    ROUNDS,
    SEQ,
    SHARD_SIZE,
    WARMUP,
    LogitsOnly,
    Workers,
    bench_inputs,
    eager_worker,
    gpipe_rank,
    time_ours,
    time_ours_stream,
    timed_merges,
)
from bench.harness import MiB, free_port, proc_cpu, proc_status, reset_peak_rss, spawn_and_get


def module_check_child(ckpt: str, plan_json: str, q: Any) -> None:
    """Time the last stage's module alone -- ours (``build_stage``) vs GPipe's (``pipeline()``
    stage 1) -- in one process, on the same microbatch, alternating."""
    torch.set_num_threads(1)
    from torch.distributed.pipelining import SplitPoint, pipeline
    from transformers import AutoModelForCausalLM

    from pipeline_core.plan import Plan
    from pipeline_core.runtime import _pick, _resolve
    from pipeline_core.stage import build_stage

    plan = Plan.from_json(plan_json)
    mb = BATCH // CHUNKS
    inputs = {k: v[:mb] for k, v in bench_inputs().items()}
    s0, s1 = build_stage(plan, 0), build_stage(plan, 1)
    raw0 = s0.forward([_resolve(w, {}, inputs) for w in s0.my_args])
    got = {(0, w.index): _pick(raw0, w.index) for w in s1.my_args if w.src == "stage"}
    args1 = [_resolve(w, got, inputs) for w in s1.my_args]
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    model.requires_grad_(False)
    pipe = pipeline(
        LogitsOnly(model),
        mb_args=(inputs["input_ids"], inputs["attention_mask"]),
        split_spec={f"m.{plan.split_points[0]}": SplitPoint.BEGINNING},
    )
    g0, g1 = pipe.get_stage_module(0), pipe.get_stage_module(1)
    del pipe, model
    with torch.no_grad():
        out0 = g0(inputs["input_ids"], inputs["attention_mask"])
        args_g = out0 if isinstance(out0, tuple) else (out0,)
        fns = {"ours": lambda: s1.forward(args1), "gpipe": lambda: g1(*args_g)}
        diff = (fns["ours"]() - fns["gpipe"]()).abs().max().item()
        times: dict[str, list[float]] = {"ours": [], "gpipe": []}
        for r in range(4):
            for name in ("ours", "gpipe") if r % 2 == 0 else ("gpipe", "ours"):
                t0 = time.perf_counter()
                for _ in range(6):
                    fns[name]()
                times[name].append((time.perf_counter() - t0) / 6)
    q.put(
        {
            "rounds": 4,
            "calls_per_round": 6,
            "s_per_microbatch_by_round": times,
            "s_per_microbatch_median": {k: statistics.median(v) for k, v in times.items()},
            "max_abs_diff": diff,
        }
    )


LAYOUTS = {
    # name: host_last_stage
    "ours": True,  # default: this (driver) process builds and runs the last stage
    "ours_3proc": False,  # the old layout: driver + one process per stage
}


def _stage_pids(pipe: Any) -> dict[int, int]:
    """Which process runs each stage (this process for a hosted last stage)."""
    return {k: pipe.procs[k].pid if k in pipe.procs else os.getpid() for k in range(2)}


def _process_labels(name: str, pipe: Any = None, workers: Any = None) -> dict[str, int]:
    """Every process of a contestant, by role; the last stage's process is listed last."""
    if name == "ours":
        return {"stage 0": pipe.procs[0].pid, "driver + stage 1": os.getpid()}
    if name == "ours_3proc":
        return {"driver": os.getpid(), "stage 0": pipe.procs[0].pid, "stage 1": pipe.procs[1].pid}
    if name == "gpipe":
        return {"rank 0 (stage 0)": workers.procs[0].pid, "rank 1 (stage 1)": workers.procs[1].pid}
    return {"process": workers.procs[0].pid}


def _cpu_delta(before: dict[str, Any], after: dict[str, Any], n: int) -> dict[str, Any]:
    return {
        role: {m: (after[role][m] - before[role][m]) / n for m in before[role]} for role in before
    }


def bench_stages(tmp: Path) -> dict[str, Any]:
    from pipeline_core import LocalPipeline, ModelSource, Policy, make_plan

    ckpt = tmp / "llama-mid"
    t0 = time.perf_counter()
    model_info = spawn_and_get(build_checkpoint_child, (str(ckpt),))
    print(
        f"[load] checkpoint {model_info['param_bytes'] / MiB:.0f} MiB in "
        f"{len(model_info['shards'])} shards ({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    plan = make_plan(ModelSource(checkpoint=str(ckpt)), Policy.equal_size(2))
    plan_json = json.dumps(plan.to_json())
    split_at = plan.split_points[0]
    print(f"[load] plan: split at {split_at}, stage bytes {[s.nbytes for s in plan.stages]}")

    probes = []
    for k in range(plan.num_stages):
        probes.append(spawn_and_get(load_probe_child, (plan_json, k)))
        p = probes[-1]
        print(
            f"[load] probe stage {k}: read {p['bytes_read'] / MiB:.1f} MiB; RSS before read "
            f"{p['before_read']['VmRSS'] / MiB:.1f} MiB, peak after load "
            f"{p['after_load']['VmHWM'] / MiB:.1f}; RssAnon +"
            f"{(p['after_load']['RssAnon'] - p['before_read']['RssAnon']) / MiB:.1f}, RssFile +"
            f"{(p['after_load']['RssFile'] - p['before_read']['RssFile']) / MiB:.1f} "
            f"(trace peak {p['after_trace']['VmHWM'] / MiB:.1f})",
            flush=True,
        )

    module_check = spawn_and_get(module_check_child, (str(ckpt), plan_json))
    print(f"[throughput] stage-1 modules alone: {module_check}", flush=True)

    inputs = bench_inputs()
    pipes: dict[str, Any] = {}
    layout_info: dict[str, Any] = {}
    rounds: dict[str, list[float]] = {
        k: [] for k in (*LAYOUTS, "ours_stream", "gpipe", "single_process")
    }
    compute: dict[str, list[float]] = {k: [] for k in rounds}
    cpu: dict[str, list[dict[str, Any]]] = {k: [] for k in rounds}
    wait: dict[str, list[float]] = {k: [] for k in rounds}
    merge: dict[str, list[float]] = {k: [] for k in rounds}
    overlap: dict[str, list[float]] = {k: [] for k in rounds}
    undo_merge_timer = timed_merges()
    tails: dict[str, Any] = {}
    shapes: dict[str, Any] = {}
    gpipe = eager = None
    try:
        for name, host_last in LAYOUTS.items():
            driver_before = proc_status()
            t0 = time.perf_counter()
            pipes[name] = LocalPipeline(plan, threads_per_stage=1, host_last_stage=host_last)
            pids = _stage_pids(pipes[name])
            layout_info[name] = {
                "host_last_stage": host_last,
                "processes": 1 + len(pipes[name].procs),
                "start_s": time.perf_counter() - t0,
                "stage_info": [dict(i) for i in pipes[name].stage_info],
                "stage_in_driver": [pid == os.getpid() for pid in pids.values()],
                "driver_status_before": driver_before,
                "status_at_ready": {k: proc_status(pid) for k, pid in pids.items()},
            }
            for k, i in enumerate(pipes[name].stage_info):
                peak = i["peak_rss_load"]
                print(
                    f"[load] {name} stage {k} stage_info: read {i['bytes_read'] / MiB:.1f} MiB, "
                    f"rss_before_load {i['rss_before_load'] / MiB:.1f} MiB, peak_rss_load "
                    f"{'None' if peak is None else f'{peak / MiB:.1f} MiB'}, rss_after_load "
                    f"{i['rss_after_load'] / MiB:.1f} MiB",
                    flush=True,
                )
        port = free_port()
        gpipe = Workers(
            "ScheduleGPipe",
            [(gpipe_rank, (r, port, str(ckpt), split_at, inputs)) for r in range(2)],
        )
        eager = Workers("single-process", [(eager_worker, (str(ckpt), inputs))])
        contestants = {
            **{n: (lambda n_, p=p: time_ours(p, inputs, n_)) for n, p in pipes.items()},
            "ours_stream": lambda n_: time_ours_stream(pipes["ours"], inputs, n_),
            "gpipe": gpipe.run,
            "single_process": eager.run,
        }
        procs = {
            **{n: _process_labels(n, pipe=p) for n, p in pipes.items()},
            "ours_stream": _process_labels("ours", pipe=pipes["ours"]),
            "gpipe": _process_labels("gpipe", workers=gpipe),
            "single_process": _process_labels("single_process", workers=eager),
        }
        for fn in contestants.values():
            fn(WARMUP)
        names = list(contestants)
        for r in range(ROUNDS):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                before = {role: proc_cpu(pid) for role, pid in procs[name].items()}
                run = contestants[name](ITERS)
                after = {role: proc_cpu(pid) for role, pid in procs[name].items()}
                cpu[name].append(_cpu_delta(before, after, ITERS))
                tails[name], shapes[name] = run.tail, run.shape
                rounds[name].append(ITERS * BATCH / run.elapsed_s)
                if run.last_stage_compute_s is not None:
                    compute[name].append(run.last_stage_compute_s / ITERS)
                if run.last_stage_wait_s is not None:
                    wait[name].append(run.last_stage_wait_s / ITERS)
                merge[name].append(run.merge_s / ITERS)
                if run.overlap_s:
                    overlap[name] += run.overlap_s
            print(
                f"[throughput] round {r}: "
                + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rounds.items())
                + " samples/s",
                flush=True,
            )
        for name, pipe in pipes.items():
            layout_info[name]["status_after_runs"] = {
                k: proc_status(pid) for k, pid in _stage_pids(pipe).items()
            }
    finally:
        for w in (gpipe, eager):
            if w is not None:
                w.close()
        for pipe in pipes.values():
            pipe.close()
        undo_merge_timer()
    for name, pipe in pipes.items():
        try:
            layout_info[name]["stage_times"] = pipe.stage_times()
        except Exception as e:  # informative only
            layout_info[name]["stage_times"] = [{"error": str(e)}]

    med = {k: statistics.median(v) for k, v in rounds.items()}
    spb = {k: BATCH / v for k, v in med.items()}
    last_compute = {k: statistics.median(v) for k, v in compute.items() if v}
    cpu_med = {
        name: {
            role: {m: statistics.median(r[role][m] for r in runs) for m in runs[0][role]}
            for role in runs[0]
        }
        for name, runs in cpu.items()
    }
    return {
        "model": model_info,
        "split_at": split_at,
        "stage_units": [s.units for s in plan.stages],
        "layouts": layout_info,
        "module_check": module_check,
        "stages": stage_memory(
            plan, {n: li["stage_info"] for n, li in layout_info.items()}, probes
        ),
        "throughput": {
            "batch": BATCH,
            "seq": SEQ,
            "chunks": CHUNKS,
            "threads_per_stage": 1,
            "warmup": WARMUP,
            "iters_per_round": ITERS,
            "rounds": ROUNDS,
            "samples_per_s_by_round": rounds,
            "samples_per_s_median": med,
            "s_per_batch_median": spb,
            # seconds per batch inside the last stage's module (median over rounds); for the
            # single process: the whole forward.  Unknown for ours_3proc (remote last stage).
            "last_stage_compute_s_per_batch_by_round": compute,
            "last_stage_compute_s_per_batch_median": last_compute,
            "other_s_per_batch": {k: spb[k] - v for k, v in last_compute.items()},
            "last_stage_wait_s_per_batch_median": {
                k: statistics.median(v) for k, v in wait.items() if v
            },
            "merge_s_per_batch_median": {k: statistics.median(v) for k, v in merge.items()},
            # GPipe: rank 1's end of step i - rank 0's start of step i+1, over all timed steps
            "cross_batch_overlap_s": overlap["gpipe"],
            "cross_batch_overlap_s_median": statistics.median(overlap["gpipe"]),
            # per process, per batch: user / system CPU seconds and minor page faults
            # (/proc/<pid>/stat deltas around each timed run; median over rounds)
            "cpu_per_batch_by_round": cpu,
            "cpu_per_batch_median": cpu_med,
            "ratio_ours_gpipe": med["ours"] / med["gpipe"],
            "ratio_ours_stream_gpipe": med["ours_stream"] / med["gpipe"],
            "ratio_ours_3proc_gpipe": med["ours_3proc"] / med["gpipe"],
            "ratio_ours_3proc_ours": med["ours_3proc"] / med["ours"],
            "ratio_ours_single_process": med["ours"] / med["single_process"],
            "output_shapes": shapes,
            "max_abs_diff": {
                f"{a}_vs_{b}": (tails[a] - tails[b]).abs().max().item()
                for a, b in (
                    ("ours", "gpipe"),
                    ("ours_stream", "gpipe"),
                    ("ours", "single_process"),
                    ("ours", "ours_3proc"),
                )
            },
        },
    }


# ---------------------------------------------------------------------------------------------
# report


def build_checkpoint_child(path: str, q: Any) -> None:
    """Save a random mid-size Llama (in a child, so the driver's own peak RSS stays small)."""
    torch.set_num_threads(1)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MID_LLAMA)).eval()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=SHARD_SIZE)
    shards = sorted(Path(path).glob("*.safetensors"))
    q.put(
        {
            "config": MID_LLAMA,
            "dtype": "float32",
            "param_bytes": nbytes,
            "shard_size": SHARD_SIZE,
            "shards": {p.name: p.stat().st_size for p in shards},
        }
    )


def load_probe_child(plan_json: str, index: int, q: Any) -> None:
    """Build stage ``index`` exactly like a stage process (``build_stage``) and record the
    process's memory split (RssAnon / RssFile) just before and right after the checkpoint read,
    which ``stage_info`` does not report: it shows whether the weights are owned (anonymous)
    memory or file-backed page-cache pages."""
    torch.set_num_threads(1)
    import pipeline_core.local  # noqa: F401  (the same imports as a LocalPipeline stage)
    from pipeline_core.load import ReadStats
    from pipeline_core.plan import Plan
    from pipeline_core.stage import build_stage

    plan = Plan.from_json(plan_json)
    marks: dict[str, Any] = {"start": proc_status()}

    def on_traced() -> None:
        marks["after_trace"] = proc_status()  # VmHWM here = peak of imports + trace
        marks["reset"] = reset_peak_rss()
        marks["before_read"] = proc_status()

    stats = ReadStats()
    stage = build_stage(plan, index, "cpu", stats=stats, on_traced=on_traced)
    marks["after_load"] = proc_status()
    marks["bytes_read"] = stats.total_bytes
    tensors = [*stage.module.parameters(), *stage.module.buffers()]
    marks["module_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
    q.put(marks)


def _load_row(si: dict[str, Any]) -> dict[str, Any]:
    """Loading memory of one stage from ``LocalPipeline.stage_info``."""
    shard, before, peak = si["bytes_read"], si["rss_before_load"], si["peak_rss_load"]
    growth = None if peak is None else peak - before
    return {
        "shard_bytes": shard,
        "files_read": sorted(si["files"]),
        "tensors": si["tensors"],
        "rss_before_load": before,
        "peak_rss_load": peak,
        "rss_after_load": si["rss_after_load"],
        "growth": growth,
        "ratio": None if growth is None else growth / shard,
        "resident_growth": si["rss_after_load"] - before,
    }


def stage_memory(
    plan: Any,
    layouts: dict[str, list[dict[str, Any]]],
    probes: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    rows = []
    for k, pr in enumerate(probes):
        b, a = pr["before_read"], pr["after_load"]
        rows.append(
            {
                "stage": k,
                "units": f"{plan.stages[k].units[0]} .. {plan.stages[k].units[-1]}",
                "plan_nbytes": plan.stages[k].nbytes,
                # LocalPipeline.stage_info of the real stages, per layout
                **{name: _load_row(info[k]) for name, info in layouts.items()},
                # probe process: same build_stage, memory split before / after the read
                "probe": {k2: v for k2, v in pr.items()},
                "probe_growth": a["VmHWM"] - b["VmRSS"],
                "probe_anon_growth": a["RssAnon"] - b["RssAnon"],
                "probe_file_growth": a["RssFile"] - b["RssFile"],
                "trace_peak": pr["after_trace"]["VmHWM"],
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# 3. throughput: LocalPipeline vs ScheduleGPipe (and a single process), interleaved rounds
