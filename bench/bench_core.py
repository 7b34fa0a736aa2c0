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

[Note: peak RSS of spawned processes]
``ru_maxrss`` of a process started by ``subprocess`` or ``multiprocessing`` "spawn" is *not*
its own peak on Linux: Python starts children with vfork + exec, and exec folds the parent's
high-water mark into the child's ``ru_maxrss``.  A child of a 1 GiB parent reports >= 1 GiB.
So every peak here is ``VmHWM`` from ``/proc/<pid>/status`` (the peak of the process's own
address space), which ``/proc/self/clear_refs`` can also reset to the current RSS.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MiB = 2**20
GiB = 2**30

LLAMA_7B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    intermediate_size=11008,
    vocab_size=32000,
)
MID_LLAMA = dict(
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    intermediate_size=1536,
    vocab_size=32000,
    tie_word_embeddings=False,
)
SHARD_SIZE = "50MB"
TRACE_TIMEOUT_S = 120.0

BATCH, SEQ, CHUNKS = 8, 128, 4
WARMUP, ITERS, ROUNDS = 2, 4, 5

GOAL_PLAN_S = 10.0
GOAL_PLAN_RSS = 1 * GiB
GOAL_LOAD_RATIO = 1.25
GOAL_THROUGHPUT_RATIO = 1.0
GOAL_MAX_DIFF = 1e-4


# ---------------------------------------------------------------------------------------------
# memory helpers (Linux)


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(val.split()[0]) * 1024
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> dict[str, float]:
    """User and system CPU seconds and minor page faults of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # after the command name: state(3) ... minflt(10) cminflt majflt cmajflt utime(14) stime(15)
    return {
        "utime_s": int(fields[11]) / _TICK,
        "stime_s": int(fields[12]) / _TICK,
        "minflt": int(fields[7]),
    }


def ru_maxrss() -> int:
    """``ru_maxrss`` in bytes (inherits the parent's peak in spawned children; see module note)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict[str, Any]:
    import transformers

    from pipeline_core.cost import cpu_name

    cpu = cpu_name()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def code_state() -> dict[str, Any]:
    """The commit and any uncommitted changes of ``pipeline_core`` (what was measured)."""
    import hashlib

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
            ).stdout.rstrip("\n")
        except OSError:
            return ""

    status = git("status", "--porcelain", "pipeline_core")
    digest = hashlib.sha256()
    for f in sorted((ROOT / "pipeline_core").rglob("*.py")):
        digest.update(f.read_bytes())
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted": [ln[3:] for ln in status.splitlines()],
        "sha256": digest.hexdigest(),
    }


def parallel_matmul_check() -> dict[str, float]:
    """How much two concurrent single-thread processes slow each other down, on the matmul
    that dominates the last stage (a microbatch of 256 tokens through a 512 x 32000 head)."""
    ctx = mp.get_context("spawn")
    out = {}
    for n in (1, 2):
        q, barrier = ctx.Queue(), ctx.Barrier(n)
        procs = [ctx.Process(target=_matmul_worker, args=(q, barrier)) for _ in range(n)]
        for p in procs:
            p.start()
        times = [q.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        out[f"{n}_proc_s"] = max(times)
    out["slowdown"] = out["2_proc_s"] / out["1_proc_s"]
    return out


def _matmul_worker(q: Any, barrier: Any) -> None:
    torch.set_num_threads(1)
    a = torch.randn(BATCH // CHUNKS * SEQ, MID_LLAMA["hidden_size"])
    w = torch.randn(MID_LLAMA["vocab_size"], MID_LLAMA["hidden_size"])
    for _ in range(3):
        a @ w.T
    barrier.wait()
    t0 = time.perf_counter()
    for _ in range(15):
        a @ w.T
    q.put((time.perf_counter() - t0) / 15)


# ---------------------------------------------------------------------------------------------
# 1. planning a Llama-7B-shaped model


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


def _spawn_and_get(target: Any, args: tuple, timeout: float = 300) -> Any:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    try:
        return q.get(timeout=timeout)
    finally:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()


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


class LogitsOnly(nn.Module):
    """A causal LM taking (input_ids, attention_mask) and returning logits only, no cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def bench_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, MID_LLAMA["vocab_size"], (BATCH, SEQ), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def gpipe_rank(
    rank: int,
    port: int,
    ckpt: str,
    split_at: str,
    inputs: dict[str, torch.Tensor],
    cmd_q: Any,
    res_q: Any,
) -> None:
    """One rank of the torch.distributed.pipelining baseline (gloo, ScheduleGPipe).

    Waits on ``cmd_q`` for a number of iterations (None: exit), runs them between two
    barriers and reports the elapsed time and the seconds spent inside the stage's submodule
    (rank 1 also the last logits)."""
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.pipelining import ScheduleGPipe, SplitPoint, pipeline
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        model.requires_grad_(False)
        mb = BATCH // CHUNKS
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        pipe = pipeline(
            LogitsOnly(model),
            mb_args=(ids[:mb], mask[:mb]),
            split_spec={f"m.{split_at}": SplitPoint.BEGINNING},
        )
        stage = pipe.build_stage(rank, torch.device("cpu"))
        del pipe, model
        gc.collect()
        schedule = ScheduleGPipe(stage, n_microbatches=CHUNKS)
        compute = [0.0]
        submod_forward = stage.submod.forward

        def timed_forward(*args: Any, **kwargs: Any) -> Any:  # PipelineStage calls submod(...)
            t = time.perf_counter()
            try:
                return submod_forward(*args, **kwargs)
            finally:
                compute[0] += time.perf_counter() - t

        stage.submod.forward = timed_forward
        merge = [0.0]
        merge_outputs = schedule._merge_outputs  # the last rank's torch.cat of the outputs

        def timed_merge(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return merge_outputs(*args, **kwargs)
            finally:
                merge[0] += time.perf_counter() - t

        schedule._merge_outputs = timed_merge

        def step() -> Any:
            with torch.no_grad():
                return schedule.step(ids, mask) if rank == 0 else schedule.step()

        res_q.put({"rank": rank, "ready": True})
        while (n := cmd_q.get()) is not None:
            dist.barrier()
            compute[0] = merge[0] = 0.0
            steps = []  # (start, end) of every step(); perf_counter is system-wide monotonic
            t0 = time.perf_counter()
            for _ in range(n):
                t = time.perf_counter()
                out = step()
                steps.append((t, time.perf_counter()))
            dist.barrier()
            res: dict[str, Any] = {
                "rank": rank,
                "elapsed_s": time.perf_counter() - t0,
                "compute_s": compute[0],
                "merge_s": merge[0],
                "steps": steps,
            }
            if rank == 1:
                res["tail"] = out[:, -4:, :].clone()
                res["shape"] = list(out.shape)
            res_q.put(res)
    except Exception as e:
        res_q.put({"rank": rank, "error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        dist.destroy_process_group()


def eager_worker(ckpt: str, inputs: dict[str, torch.Tensor], cmd_q: Any, res_q: Any) -> None:
    """Single process, one thread, the whole model (no pipeline): a reference point."""
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    try:
        model = LogitsOnly(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32))
        model.eval().requires_grad_(False)
        res_q.put({"rank": 0, "ready": True})
        while (n := cmd_q.get()) is not None:
            t0 = time.perf_counter()
            with torch.no_grad():
                for _ in range(n):
                    out = model(inputs["input_ids"], inputs["attention_mask"])
            elapsed = time.perf_counter() - t0
            res_q.put(
                {
                    "rank": 0,
                    "elapsed_s": elapsed,
                    "compute_s": elapsed,
                    "merge_s": 0.0,
                    "tail": out[:, -4:, :].clone(),
                    "shape": list(out.shape),
                }
            )
    except Exception as e:
        res_q.put({"rank": 0, "error": f"{type(e).__name__}: {e}"})
        raise


@dataclass
class Run:
    """One timed run of one contestant."""

    elapsed_s: float
    tail: torch.Tensor  # logits of the last 4 positions
    shape: list[int]
    last_stage_compute_s: float | None  # seconds inside the last stage's module (None: unknown)
    last_stage_wait_s: float | None  # ours, hosted last stage: waiting for stage 0's activations
    merge_s: float  # concatenating the microbatches' outputs
    overlap_s: list[float] | None = None  # GPipe: rank 1's end of step i - rank 0's start of i+1


_MERGE_S = [0.0]  # time in pipeline_core.runtime.merge_microbatches in this process


def timed_merges() -> Any:
    """Wrap ``pipeline_core.runtime.merge_microbatches`` (what ``Driver.run`` calls to
    concatenate the outputs) with a timer; returns a function that undoes it."""
    import pipeline_core.runtime as rt

    original = rt.merge_microbatches

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _MERGE_S[0] += time.perf_counter() - t

    rt.merge_microbatches = timed

    def undo() -> None:
        rt.merge_microbatches = original

    return undo


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


def _module_check_text(mc: dict[str, Any] | None) -> str:
    if not mc:
        return ""
    med = mc["s_per_microbatch_median"]
    return (
        "Alone, in one process, on the same microbatch (alternating, median of "
        f"{mc['rounds']} x {mc['calls_per_round']} calls), our stage-1 module takes "
        f"{med['ours']:.4f} s and GPipe's {med['gpipe']:.4f} s per microbatch (ratio "
        f"{med['ours'] / med['gpipe']:.3f}, same output to {mc['max_abs_diff']:.2g}), i.e. "
        f"{med['ours'] * CHUNKS:.3f} vs {med['gpipe'] * CHUNKS:.3f} s per batch.  "
    )


class Workers:
    """Persistent worker processes driven by command queues (idle ones block on a queue)."""

    def __init__(self, name: str, targets: list[tuple[Any, tuple]]) -> None:
        ctx = mp.get_context("spawn")
        self.name = name
        self.res_q = ctx.Queue()
        self.cmd_qs = [ctx.Queue() for _ in targets]
        self.procs = [
            ctx.Process(target=fn, args=(*args, cq, self.res_q))
            for (fn, args), cq in zip(targets, self.cmd_qs, strict=True)
        ]
        for p in self.procs:
            p.start()
        self._collect(timeout=300)

    def _collect(self, timeout: float) -> dict[int, dict[str, Any]]:
        got = {}
        for _ in self.procs:
            r = self.res_q.get(timeout=timeout)
            if "error" in r:
                self.close()
                raise RuntimeError(f"{self.name} worker {r['rank']} failed: {r['error']}")
            got[r["rank"]] = r
        return got

    def run(self, n: int) -> Run:
        for q in self.cmd_qs:
            q.put(n)
        got = self._collect(timeout=600)
        last = got[max(got)]
        elapsed = max(r["elapsed_s"] for r in got.values())
        run = Run(elapsed, last["tail"], last["shape"], last["compute_s"], None, last["merge_s"])
        if len(got) == 2:  # how long rank 0 is already on batch i+1 while rank 1 finishes batch i
            first, last_steps = got[0]["steps"], got[1]["steps"]
            run.overlap_s = [last_steps[i][1] - first[i + 1][0] for i in range(len(first) - 1)]
        return run

    def close(self) -> None:
        for q in self.cmd_qs:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def time_ours(pipe: Any, inputs: dict[str, torch.Tensor], n: int) -> Run:
    """Time ``n`` calls; when this process hosts the last stage, also its compute seconds."""
    hosted = pipe.driver.hosted
    c0, w0 = (hosted.times.compute_s, hosted.times.wait_s) if hosted is not None else (0, 0)
    _MERGE_S[0] = 0.0
    t0 = time.perf_counter()
    for _ in range(n):
        out = pipe(**inputs, chunks=CHUNKS)
    elapsed = time.perf_counter() - t0
    compute = hosted.times.compute_s - c0 if hosted is not None else None
    wait = hosted.times.wait_s - w0 if hosted is not None else None
    return Run(elapsed, out[:, -4:, :].clone(), list(out.shape), compute, wait, _MERGE_S[0])


def time_ours_stream(pipe: Any, inputs: dict[str, torch.Tensor], n: int) -> Run:
    """``n`` batches streamed with ``pipe.imap``: like GPipe's back-to-back ``step()`` calls,
    stage 0 starts batch i+1 while the last stage still works on batch i."""
    hosted = pipe.driver.hosted
    c0, w0 = (hosted.times.compute_s, hosted.times.wait_s) if hosted is not None else (0, 0)
    _MERGE_S[0] = 0.0
    t0 = time.perf_counter()
    for out in pipe.imap([inputs] * n, chunks=CHUNKS):  # noqa: B007
        pass  # like GPipe's step() loop, keep only the latest output
    elapsed = time.perf_counter() - t0
    compute = hosted.times.compute_s - c0 if hosted is not None else None
    wait = hosted.times.wait_s - w0 if hosted is not None else None
    return Run(elapsed, out[:, -4:, :].clone(), list(out.shape), compute, wait, _MERGE_S[0])


# ---------------------------------------------------------------------------------------------
# 2 + 3 share one checkpoint, plan and the LocalPipelines

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
    model_info = _spawn_and_get(build_checkpoint_child, (str(ckpt),))
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
        probes.append(_spawn_and_get(load_probe_child, (plan_json, k)))
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

    module_check = _spawn_and_get(module_check_child, (str(ckpt), plan_json))
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


def _mb(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def _pf(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def _growth(row: dict[str, Any]) -> str:
    if row["growth"] is None:
        return "peak unknown (VmHWM reset failed)"
    return _mb(row["growth"])


def _ratio(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _table(res: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    p0, p1 = res["plan"]["trace_false"], res["plan"]["trace_true"]
    if p0["status"] == "ok":
        weights = p0["total_bytes"]
        rows.append(
            (
                "Plan Llama-7B shape, `equal_size(4)`, `trace=False`: time of `make_plan`",
                f"<= {GOAL_PLAN_S:.0f} s",
                f"{p0['plan_s']:.2f} s ({p0['subprocess_wall_s']:.1f} s incl. interpreter "
                "+ imports)",
                "-",
                "-",
                _pf(p0["plan_s"] <= GOAL_PLAN_S),
            )
        )
        rows.append(
            (
                "Plan Llama-7B shape, `trace=False`: peak RSS of the subprocess (VmHWM)",
                f"< {GOAL_PLAN_RSS / GiB:.0f} GiB",
                f"{_mb(p0['peak_rss'])} ({_mb(p0['peak_rss_after_import'])} after imports)",
                f"fp32 weights {weights / GiB:.1f} GiB",
                f"{p0['peak_rss'] / weights:.4f}",
                _pf(p0["peak_rss"] < GOAL_PLAN_RSS),
            )
        )
    else:
        rows.append(("Plan Llama-7B shape, `trace=False`", "runs", p0["status"], "-", "-", "FAIL"))
    if p1["status"] == "ok":
        rows.append(
            (
                "Plan Llama-7B shape, `trace=True` (`torch.export` on fake tensors): time",
                f"< {TRACE_TIMEOUT_S:.0f} s",
                f"{p1['plan_s']:.2f} s ({p1['subprocess_wall_s']:.1f} s incl. imports), "
                f"peak RSS {_mb(p1['peak_rss'])}",
                "-",
                "-",
                _pf(p1["plan_s"] < TRACE_TIMEOUT_S),
            )
        )
    else:
        rows.append(
            (
                "Plan Llama-7B shape, `trace=True`: time",
                f"< {TRACE_TIMEOUT_S:.0f} s",
                f"{p1['status']} ({p1.get('reason', p1.get('returncode', ''))})",
                "-",
                "-",
                "n/a" if p1["status"] == "skipped" else "FAIL",
            )
        )
    st = res["stages"]
    lay = st["layouts"]
    where = {True: "hosted in the driver process", False: "its own process"}
    for s in st["stages"]:
        r = s["ours"]
        rows.append(
            (
                f"Stage {s['stage']} loading ({where[lay['ours']['stage_in_driver'][s['stage']]]}"
                "): peak RSS growth from just before the checkpoint read until loaded "
                "(`stage_info`: `peak_rss_load - rss_before_load`)",
                f"<= {GOAL_LOAD_RATIO} x shard",
                _growth(r),
                f"shard read {_mb(r['shard_bytes'])}",
                _ratio(r["ratio"]),
                _pf(r["ratio"] is not None and r["ratio"] <= GOAL_LOAD_RATIO),
            )
        )
    three = [s["ours_3proc"] for s in st["stages"]]
    rows.append(
        (
            "Same, `host_last_stage=False` (every stage in its own process): stage "
            + " / stage ".join(str(s["stage"]) for s in st["stages"]),
            "info",
            " / ".join(_growth(r) for r in three),
            "shard read " + " / ".join(_mb(r["shard_bytes"]) for r in three),
            " / ".join(_ratio(r["ratio"]) for r in three),
            "n/a",
        )
    )
    rows.append(
        (
            "Where the loaded weights live (probe process, same `build_stage`): RssAnon / "
            "RssFile growth across the read, stage "
            + " / stage ".join(str(s["stage"]) for s in st["stages"]),
            "info",
            " / ".join(
                f"+{_mb(s['probe_anon_growth'])} anon, +{_mb(s['probe_file_growth'])} file"
                for s in st["stages"]
            ),
            "shard read " + " / ".join(_mb(s["probe"]["bytes_read"]) for s in st["stages"]),
            " / ".join(
                f"{s['probe_anon_growth'] / s['probe']['bytes_read']:.3f}" for s in st["stages"]
            )
            + " (anon / shard)",
            "n/a",
        )
    )
    tp = st["throughput"]
    med = tp["samples_per_s_median"]
    spb = tp["s_per_batch_median"]
    rows.append(
        (
            f"Pipelined forward, 2 stages x 1 thread, batch {BATCH}x{SEQ}, {CHUNKS} "
            f"microbatches (median of {ROUNDS} rounds), batches back to back as GPipe's "
            f"`step()` loop runs them: ours = default `LocalPipeline` "
            f"({lay['ours']['processes']} processes) with `pipe.imap(batches)`",
            f"ours / GPipe >= {GOAL_THROUGHPUT_RATIO}",
            f"{med['ours_stream']:.2f} samples/s ({spb['ours_stream']:.3f} s/batch)",
            f"ScheduleGPipe {med['gpipe']:.2f} samples/s ({spb['gpipe']:.3f} s/batch)",
            f"{tp['ratio_ours_stream_gpipe']:.3f}",
            _pf(tp["ratio_ours_stream_gpipe"] >= GOAL_THROUGHPUT_RATIO),
        )
    )
    rows.append(
        (
            "Same forward, one `pipe(...)` call per batch (each call fills and drains the "
            "pipeline)",
            "info",
            f"{med['ours']:.2f} samples/s ({spb['ours']:.3f} s/batch)",
            f"ScheduleGPipe {med['gpipe']:.2f} samples/s ({spb['gpipe']:.3f} s/batch)",
            f"{tp['ratio_ours_gpipe']:.3f}",
            "n/a",
        )
    )
    rows.append(
        (
            "Same forward, `LocalPipeline(host_last_stage=False)` "
            f"({lay['ours_3proc']['processes']} processes: driver + 2 stages)",
            "info",
            f"{med['ours_3proc']:.2f} samples/s ({spb['ours_3proc']:.3f} s/batch)",
            f"ScheduleGPipe {med['gpipe']:.2f} samples/s",
            f"{tp['ratio_ours_3proc_gpipe']:.3f}",
            "n/a",
        )
    )
    rows.append(
        (
            "Same forward, reference: one process, 1 thread, no pipeline",
            "info",
            f"{med['ours']:.2f} samples/s (ours)",
            f"single process {med['single_process']:.2f} samples/s "
            f"({spb['single_process']:.3f} s/batch)",
            f"{tp['ratio_ours_single_process']:.3f}",
            "n/a",
        )
    )
    lc = tp["last_stage_compute_s_per_batch_median"]
    wt, mg = tp["last_stage_wait_s_per_batch_median"], tp["merge_s_per_batch_median"]
    rest = {
        "ours": spb["ours"] - lc["ours"] - wt["ours"] - mg["ours"],
        "gpipe": spb["gpipe"] - lc["gpipe"] - mg["gpipe"],
    }
    rows.append(
        (
            "Where the time goes (s/batch, medians per round): last stage's compute (inside its "
            "module) + its wait for stage 0 (pipeline fill) + concatenating the outputs + the "
            "rest",
            "info",
            f"ours {spb['ours']:.3f} = {lc['ours']:.3f} compute + {wt['ours']:.3f} wait + "
            f"{mg['ours']:.3f} cat + {rest['ours']:.3f} rest",
            f"GPipe {spb['gpipe']:.3f} = {lc['gpipe']:.3f} compute + {mg['gpipe']:.3f} cat + "
            f"{rest['gpipe']:.3f} rest (fill, transfers, barriers); its rank 0 starts batch "
            f"i+1 {tp['cross_batch_overlap_s_median']:.3f} s before rank 1 ends batch i",
            f"{lc['ours'] / lc['gpipe']:.3f} (compute)",
            "n/a",
        )
    )
    c_ours = tp["cpu_per_batch_median"]["ours"]["driver + stage 1"]
    c_gp = tp["cpu_per_batch_median"]["gpipe"]["rank 1 (stage 1)"]
    rows.append(
        (
            "CPU per batch of the process running the last stage (all threads; "
            "`/proc/<pid>/stat`): user + sys seconds, minor page faults",
            "info",
            f"ours (driver + stage 1): {c_ours['utime_s']:.3f} + {c_ours['stime_s']:.3f} s, "
            f"{c_ours['minflt']:.0f} faults",
            f"GPipe rank 1: {c_gp['utime_s']:.3f} + {c_gp['stime_s']:.3f} s, "
            f"{c_gp['minflt']:.0f} faults",
            f"{c_ours['minflt'] / max(c_gp['minflt'], 1):.2f} (faults)",
            "n/a",
        )
    )
    c3 = tp["cpu_per_batch_median"]["ours_3proc"]
    rows.append(
        (
            "What `host_last_stage=False` costs: its s/batch - the default's; beside it, the "
            "CPU per batch of its driver (receives the logits over gloo and concatenates them) "
            "and of its stage-1 process (sends them)",
            "info",
            f"{spb['ours_3proc'] - spb['ours']:.3f} s/batch",
            f"driver {c3['driver']['utime_s']:.3f} + {c3['driver']['stime_s']:.3f} s, "
            f"{c3['driver']['minflt']:.0f} faults, cat {mg['ours_3proc']:.3f} s; stage 1 "
            f"{c3['stage 1']['utime_s']:.3f} + {c3['stage 1']['stime_s']:.3f} s, "
            f"{c3['stage 1']['minflt']:.0f} faults",
            f"{tp['ratio_ours_3proc_ours']:.3f} (throughput vs default)",
            "n/a",
        )
    )
    d = tp["max_abs_diff"]
    rows.append(
        (
            "Same logits: max abs diff of ours vs GPipe / vs single process / vs "
            "`host_last_stage=False` (last 4 positions)",
            f"<= {GOAL_MAX_DIFF:g}",
            " / ".join(
                f"{d[k]:.3g}"
                for k in ("ours_vs_gpipe", "ours_vs_single_process", "ours_vs_ours_3proc")
            ),
            "-",
            "-",
            _pf(max(d.values()) <= GOAL_MAX_DIFF),
        )
    )
    return rows


def _cpu(c: dict[str, float]) -> str:
    return f"{c['utime_s']:.3f} user + {c['stime_s']:.3f} sys s, {c['minflt']:.0f} minor faults"


def _code_text(res: dict[str, Any]) -> str:
    code = res.get("code")
    if not code:
        return "pipeline_core version not recorded."
    dirty = code["uncommitted"]
    text = f"pipeline_core at commit `{code['commit']}`" + (
        f" plus uncommitted changes to {', '.join(f'`{f}`' for f in dirty)}." if dirty else "."
    )
    if res.get("code_changed_during_run"):
        text += "  **pipeline_core changed while this ran: the numbers may mix two versions.**"
    return text


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    st = res["stages"]
    tp = st["throughput"]
    mi = st["model"]
    lay = st["layouts"]
    p0 = res["plan"]["trace_false"]
    pm = res["parallel_matmul"]
    rows = _table(res)
    s_rows = st["stages"]
    by_round = "; ".join(
        f"{k}: {', '.join(f'{v:.2f}' for v in vals)}"
        for k, vals in tp["samples_per_s_by_round"].items()
    )

    def stage_times(name: str) -> str:
        return ", ".join(
            f"stage {k} compute {t.get('compute_s', float('nan')):.2f} s / wait "
            f"{t.get('wait_s', float('nan')):.2f} s over {t.get('microbatches', 0)} microbatches"
            for k, t in enumerate(lay[name]["stage_times"])
        )

    def per_batch_compute(name: str, k: int) -> float:
        t = lay[name]["stage_times"][k]
        return t["compute_s"] / t["microbatches"] * CHUNKS if t.get("microbatches") else 0.0

    cpu = tp["cpu_per_batch_median"]
    cpu_text = "; ".join(
        f"{name}: " + ", ".join(f"{role} {_cpu(c)}" for role, c in roles.items())
        for name, roles in cpu.items()
    )
    after = lay["ours"]["status_after_runs"]
    after3 = lay["ours_3proc"]["status_after_runs"]
    lines = [
        "# pipeline_core benchmark",
        "",
        f"Generated by `python -m bench.bench_core` on {res['date']} in {res['total_s']:.0f} s, "
        + _code_text(res),
        "",
        f"Machine: **{m['cpu']}**, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['memory_gib']} GiB RAM; torch {m['torch']}, transformers {m['transformers']}, "
        f"Python {m['python']} ({m['platform']}).  Every computing process uses "
        "`torch.set_num_threads(1)`.  Two single-thread processes running the last stage's "
        f"biggest matmul ({BATCH // CHUNKS * SEQ} x {MID_LLAMA['hidden_size']} by "
        f"{MID_LLAMA['hidden_size']} x {MID_LLAMA['vocab_size']}) at the same time each take "
        f"{pm['slowdown']:.2f}x as long as one alone (1.00 would be two independent cores; "
        "this shared VM varies from run to run).",
        "",
        "| metric | goal | measured | baseline | ratio | pass/fail |",
        "|---|---|---|---|---|---|",
        *[f"| {' | '.join(r)} |" for r in rows],
        "",
        "## How it was measured",
        "",
        "**Peak RSS.** `ru_maxrss` is a high-water mark, and on Linux a process started by "
        "`subprocess` or `multiprocessing` (spawn) *inherits its parent's* `ru_maxrss` (Python "
        "starts children with vfork + exec; exec folds the parent's peak into the child's). "
        "So every peak below is `VmHWM` from `/proc/<pid>/status`, the peak of the process's "
        "own memory, which `echo 5 > /proc/self/clear_refs` resets to the current RSS "
        "(`pipeline_core`'s own `stage_info` now does the same).",
        "",
        "**Planning.** A `LlamaConfig` with hidden 4096, 32 layers, 32 heads, intermediate "
        "11008, vocab 32000 is written with `save_pretrained` (only `config.json`, no weights). "
        "A fresh `python` subprocess imports `pipeline_core` and times `make_plan(ModelSource"
        "(checkpoint=DIR), Policy.equal_size(4), trace=False)`; its peak RSS is VmHWM at the "
        "end, so it includes the interpreter, torch and transformers (the peak after imports "
        "is shown beside it; `ru_maxrss` of the same process read "
        f"{_mb(p0.get('ru_maxrss', 0))}).  The baseline is the fp32 weight bytes a planner "
        "that instantiated the model would need.  Split points: "
        f"`{', '.join(p0.get('split_points', []))}`.  The `trace=True` run (which also captures "
        f"the model with `torch.export` on fake tensors) gets {TRACE_TIMEOUT_S:.0f} s and would "
        "be recorded as skipped if it took longer.",
        "",
        f"**Loading memory.** A random `LlamaForCausalLM` (hidden {MID_LLAMA['hidden_size']}, "
        f"{MID_LLAMA['num_hidden_layers']} layers, intermediate {MID_LLAMA['intermediate_size']},"
        f" vocab {MID_LLAMA['vocab_size']}, untied head, fp32, {_mb(mi['param_bytes'])}) is "
        f'saved with `max_shard_size="{SHARD_SIZE}"` ({len(mi["shards"])} safetensors shards) '
        f"and planned with `equal_size(2)` (split at `{st['split_at']}`).  `build_stage` first "
        "rebuilds the skeleton and traces it (`torch.export`, transient memory), then reads the "
        "stage's tensors: the loader reads each tensor's byte range with `readinto` into a "
        "buffer the stage owns (no mmap), so the weights are resident when it returns.  The "
        "numbers in the goal rows are the real stages' `LocalPipeline.stage_info`: "
        "`rss_before_load` is VmRSS after tracing, when VmHWM is reset; `peak_rss_load` is VmHWM "
        "after loading; growth = `peak_rss_load - rss_before_load`, goal growth / `bytes_read` "
        f"<= {GOAL_LOAD_RATIO}.  With the default layout stage 1 is built in the driver (this "
        "benchmark's process, after it had planned the model; its RSS before the read was "
        + _mb(s_rows[-1]["ours"]["rss_before_load"])
        + " vs "
        + _mb(s_rows[0]["ours"]["rss_before_load"])
        + " in the stage-0 process); with `host_last_stage=False` both stages are fresh "
        "processes.  RSS right after loading (`rss_after_load - rss_before_load`): "
        + ", ".join(
            f"stage {s['stage']} {_mb(s['ours']['resident_growth'])} (default) / "
            f"{_mb(s['ours_3proc']['resident_growth'])} (`host_last_stage=False`)"
            for s in s_rows
        )
        + ", i.e. the peak is the resident weights.  `stage_info` does not split RSS into "
        "anonymous and file-backed pages, so one probe process per stage runs the same "
        "`build_stage(..., on_traced=...)` and reads `RssAnon` / `RssFile` from "
        "`/proc/self/status` in the callback and after loading: the growth is anonymous memory "
        "owned by the process (the 'where the loaded weights live' row), not page cache. "
        "Peak of imports + skeleton + trace before the read (probe): "
        + ", ".join(_mb(s["trace_peak"]) for s in s_rows)
        + ".",
        "",
        f"**Throughput.** All contestants use the same checkpoint, the same split "
        f"(`{st['split_at']}`), 1 thread per process, the same batch ({BATCH} x {SEQ} tokens, "
        f"all-ones attention mask) cut into {CHUNKS} microbatches, and run in the same session: "
        f"{WARMUP} warm-up iterations each, then {ROUNDS} rounds of {ITERS} timed iterations, "
        "rotating the order every round (idle contestants block on a queue or a socket).  "
        "Ours: `LocalPipeline(plan, threads_per_stage=1)`; this process times "
        f"`pipe(input_ids=..., attention_mask=..., chunks={CHUNKS})`.  By default it is also "
        "stage 1 (the last stage): it sends the microbatches to the stage-0 process, receives "
        "stage 0's activations, runs stage 1 itself and concatenates the logits "
        f"({BATCH}x{SEQ}x{MID_LLAMA['vocab_size']} fp32 = "
        f"{BATCH * SEQ * MID_LLAMA['vocab_size'] * 4 / MiB:.0f} MiB per batch), which never "
        "leave the process: 2 processes, like GPipe.  `host_last_stage=False` (the info row) "
        "is the previous layout: this process only drives, and stage 1, in a third process, "
        "sends every microbatch's logits back over gloo.  GPipe: 2 processes with "
        '`init_process_group("gloo")`, each loading the checkpoint with `from_pretrained`, '
        "`pipeline()` on a wrapper returning logits only (`use_cache=False`), "
        f"`pipe.build_stage(rank)`, `ScheduleGPipe(stage, n_microbatches={CHUNKS})`, "
        "`schedule.step(...)` under `torch.no_grad()`, timed between two barriers; its logits "
        "stay on (and are concatenated on) the last rank.  Single process: the whole model in "
        "one process, full batch.  samples/s = iterations x batch / seconds; per round: "
        f"{by_round}.",
        "",
        "**Where the time goes.** Measured inside each timed run and divided by the batches: "
        "*compute* is the time inside the last stage's module (ours: the hosted stage's own "
        "`compute_s`, around `Stage.forward`; GPipe: a timer around its stage-1 submodule's "
        "`forward`, which `PipelineStage` calls once per microbatch; single process: its "
        "whole forward); *wait* is the hosted stage's `wait_s`, receiving stage 0's "
        "activations (it includes the pipeline fill: nothing arrives before stage 0 has run "
        "the first microbatch); *cat* is the concatenation of the microbatches' outputs (a "
        "timer around `pipeline_core.runtime.merge_microbatches` in this process, and around the "
        "schedule's `_merge_outputs` on GPipe's ranks); *rest* is what is left of the wall "
        "time (for GPipe that includes its fill).  Per-process CPU per batch (all threads, "
        "from `/proc/<pid>/stat` around each timed run, median over rounds, 10 ms ticks): "
        f"{cpu_text}.  A page of new memory costs a minor fault when first written: one "
        f"batch of logits is {BATCH * SEQ * MID_LLAMA['vocab_size'] * 4 // 4096} pages, and "
        "the last stage writes them twice (the per-microbatch outputs, then their "
        "concatenation).  Our stages' totals over all runs (warm-up included): default: "
        f"{stage_times('ours')}; `host_last_stage=False`: {stage_times('ours_3proc')}.  Per "
        f"batch that is a last-stage compute of {per_batch_compute('ours', 1):.3f} s (default) "
        f"vs {per_batch_compute('ours_3proc', 1):.3f} s (`host_last_stage=False`); stage 0 "
        f"computes {per_batch_compute('ours', 0):.3f} s per batch, so the last stage bounds "
        f"the pipelines (it holds the {MID_LLAMA['vocab_size']}-word head: `equal_size` "
        "balances bytes, and the "
        + _mb(MID_LLAMA["vocab_size"] * MID_LLAMA["hidden_size"] * 4)
        + " embedding table on stage 0 costs no compute).  "
        + _module_check_text(st.get("module_check"))
        + "Consecutive batches: each `pipe(...)` call returns once its whole batch is done, and "
        "the next call sends new inputs only then, so our stage 0 has nothing to do while the "
        "driver finishes stage 1 and concatenates, and every batch starts with a fill.  "
        "GPipe's ranks are not synchronised between `schedule.step()` calls (only around the "
        "timed run): from the start/end time of every step on both ranks, rank 0 began batch "
        "i+1 a median "
        f"{tp['cross_batch_overlap_s_median']:.3f} s before rank 1 finished batch i (over "
        f"{len(tp['cross_batch_overlap_s'])} pairs of consecutive timed steps), i.e. its fill "
        "overlaps the previous batch's tail.",
        "",
        "Memory after the timed runs: default layout, stage-0 process "
        + _mb(after["0"]["VmRSS"])
        + " RSS, the driver (hosting stage 1) "
        + _mb(after["1"]["VmRSS"])
        + " RSS ("
        + _mb(after["1"]["RssAnon"])
        + " anonymous, peak "
        + _mb(after["1"]["VmHWM"])
        + "; this process also planned the model, drives the other pipeline and keeps the last "
        "outputs); `host_last_stage=False`: stage-1 process "
        + _mb(after3["1"]["VmRSS"])
        + " RSS ("
        + _mb(after3["1"]["RssAnon"])
        + " anonymous, peak "
        + _mb(after3["1"]["VmHWM"])
        + ").  Startup (`LocalPipeline(...)` until ready): "
        + f"{lay['ours']['start_s']:.1f} s default, {lay['ours_3proc']['start_s']:.1f} s "
        "`host_last_stage=False`.",
        "",
    ]
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


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
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(res), indent=2) + "\n"
    (out / "core.json").write_text(text)
    (out / "core.md").write_text(markdown(json.loads(text)))  # same input as --report-only
    print(f"wrote {out / 'core.json'} and {out / 'core.md'} ({res['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
