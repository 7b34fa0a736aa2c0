"""Benchmark pipeline_core: planning cost, per-stage loading memory, pipelined throughput.

Run from the repository root::

    python -m bench.bench_core

Writes ``bench/results/core.json`` (every number) and ``bench/results/core.md`` (a table of
metric, goal, measured, baseline, ratio and pass/fail, plus the machine).  Every process that
computes runs with ``torch.set_num_threads(1)``; the whole run takes about 3 minutes on 2 cores.

1. **Planning** a Llama-7B-shaped model (only ``config.json`` on disk) with
   ``make_plan(..., Policy.equal_size(4), trace=False)`` in a fresh subprocess: wall time and
   peak RSS.  Then the same with ``trace=True`` (``torch.export`` on fake tensors), given at
   most 120 s.
2. **Loading memory** of each stage of a ~230 MiB random Llama saved as 50 MB safetensors
   shards, split in 2: how much a stage process's RSS grows from just before it reads its
   tensors until every weight is resident, relative to the bytes it reads.
3. **Throughput** of ``LocalPipeline`` (2 stages, fill-drain, 4 microbatches) against
   ``torch.distributed.pipelining``'s ``ScheduleGPipe`` on the same split of the same
   checkpoint (plus a single-process eager reference), measured in interleaved rounds.

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

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
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


def gather_cost_check() -> dict[str, float]:
    """Time to move one batch of logits (CHUNKS microbatches) from a stage to the driver with
    pipeline_core's own transport (gloo), then join them: what ``LocalPipeline`` does and
    ``ScheduleGPipe`` (logits stay on the last rank) does not."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_gather_worker, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = q.get(timeout=300)
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    return res


def _gather_worker(rank: int, port: int, q: Any) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from pipeline_core.transport import Channel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ch = Channel(dist.distributed_c10d._get_default_group())
    shape = (BATCH // CHUNKS, SEQ, MID_LLAMA["vocab_size"])
    try:
        times = []
        for it in range(WARMUP + 5):
            logits = [torch.randn(shape) for _ in range(CHUNKS)] if rank == 0 else []
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                for t in logits:
                    ch.send([t], 1)
                ch.flush()
            else:
                out = torch.cat([ch.recv(0)[0] for _ in range(CHUNKS)])
                if it >= WARMUP:
                    times.append(time.perf_counter() - t0)
        if rank == 1:
            q.put(
                {
                    "bytes_per_batch": out.numel() * out.element_size(),
                    "s_per_batch": statistics.median(times),
                }
            )
    finally:
        dist.destroy_process_group()


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
    """Build stage ``index`` exactly like a stage process (``build_stage``), resetting the peak
    RSS between the skeleton/trace and the checkpoint read, then touch every weight."""
    torch.set_num_threads(1)
    import pipeline_core.local  # noqa: F401  (the same imports as a LocalPipeline stage)
    import pipeline_core.stage as stage_mod
    from pipeline_core.load import ReadStats
    from pipeline_core.plan import Plan

    plan = Plan.from_json(plan_json)
    marks: dict[str, Any] = {"start": proc_status()}
    original = stage_mod.trace_plan

    def trace_then_reset(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        gc.collect()
        marks["after_trace"] = proc_status()  # VmHWM here = peak of imports + trace
        marks["reset"] = reset_peak_rss()
        marks["before_read"] = proc_status()
        return out

    stage_mod.trace_plan = trace_then_reset  # build_stage looks it up in its module
    try:
        stats = ReadStats()
        stage = stage_mod.build_stage(plan, index, "cpu", stats=stats)
    finally:
        stage_mod.trace_plan = original
    marks["after_read"] = proc_status()
    marks["bytes_read"] = stats.total_bytes
    tensors = [*stage.module.parameters(), *stage.module.buffers()]
    marks["module_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
    with torch.no_grad():
        for t in tensors:  # fault in every page (safetensors tensors are lazy mmap views)
            t.float().sum()
    marks["after_touch"] = proc_status()
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


def stage_memory(
    plan: Any, info: list[dict[str, Any]], probes: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    rows = []
    for k, (si, pr) in enumerate(zip(info, probes, strict=True)):
        shard = si["bytes_read"]
        before = pr["before_read"]["VmRSS"]
        read_growth = pr["after_read"]["VmHWM"] - before
        load_growth = pr["after_touch"]["VmHWM"] - before
        rows.append(
            {
                "stage": k,
                "units": f"{plan.stages[k].units[0]} .. {plan.stages[k].units[-1]}",
                "plan_nbytes": plan.stages[k].nbytes,
                "shard_bytes": shard,
                "files_read": sorted(si["files"]),
                # probe process: same build_stage, VmHWM reset between trace and read
                "probe": {k2: v for k2, v in pr.items() if k2 != "bytes_read"},
                "read_growth": read_growth,
                "read_ratio": read_growth / shard,
                "load_growth": load_growth,
                "load_ratio": load_growth / shard,
                "resident_file_growth": pr["after_touch"]["RssFile"] - pr["before_read"]["RssFile"],
                "resident_anon_growth": pr["after_touch"]["RssAnon"] - pr["before_read"]["RssAnon"],
                "trace_peak": pr["after_trace"]["VmHWM"],
                "rss_before_read": before,
                # LocalPipeline's own report for the real stage process
                "runtime_peak_rss_before": si["peak_rss_before"],
                "runtime_peak_rss": si["peak_rss"],
                "runtime_build_growth": si["peak_rss"] - si["peak_rss_before"],
                "runtime_true_peak_at_ready": si["status_at_ready"]["VmHWM"],
                "runtime_rss_at_ready": si["status_at_ready"]["VmRSS"],
                "runtime_status_after_runs": si.get("status_after_runs"),
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
    barriers and reports the elapsed time (rank 1 also the last logits)."""
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

        def step() -> Any:
            with torch.no_grad():
                return schedule.step(ids, mask) if rank == 0 else schedule.step()

        res_q.put({"rank": rank, "ready": True})
        while (n := cmd_q.get()) is not None:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(n):
                out = step()
            dist.barrier()
            res: dict[str, Any] = {"rank": rank, "elapsed_s": time.perf_counter() - t0}
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
            res_q.put(
                {
                    "rank": 0,
                    "elapsed_s": time.perf_counter() - t0,
                    "tail": out[:, -4:, :].clone(),
                    "shape": list(out.shape),
                }
            )
    except Exception as e:
        res_q.put({"rank": 0, "error": f"{type(e).__name__}: {e}"})
        raise


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

    def run(self, n: int) -> tuple[float, torch.Tensor, list[int]]:
        for q in self.cmd_qs:
            q.put(n)
        got = self._collect(timeout=600)
        last = got[max(got)]
        return max(r["elapsed_s"] for r in got.values()), last["tail"], last["shape"]

    def close(self) -> None:
        for q in self.cmd_qs:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def time_ours(pipe: Any, inputs: dict[str, torch.Tensor], n: int) -> tuple[float, Any, list]:
    t0 = time.perf_counter()
    for _ in range(n):
        out = pipe(**inputs, chunks=CHUNKS)
    return time.perf_counter() - t0, out[:, -4:, :].clone(), list(out.shape)


# ---------------------------------------------------------------------------------------------
# 2 + 3 share one checkpoint, plan and LocalPipeline


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
            f"{p['before_read']['VmRSS'] / MiB:.1f} MiB, peak during read "
            f"{p['after_read']['VmHWM'] / MiB:.1f}, peak after touching weights "
            f"{p['after_touch']['VmHWM'] / MiB:.1f} "
            f"(trace peak {p['after_trace']['VmHWM'] / MiB:.1f})",
            flush=True,
        )

    inputs = bench_inputs()
    driver_ru_maxrss = ru_maxrss()
    t0 = time.perf_counter()
    pipe = LocalPipeline(plan, threads_per_stage=1)
    start_s = time.perf_counter() - t0
    rounds: dict[str, list[float]] = {"ours": [], "gpipe": [], "single_process": []}
    tails: dict[str, Any] = {}
    shapes: dict[str, Any] = {}
    gpipe = eager = None
    try:
        info = [dict(i) for i in pipe.stage_info]
        for i, p in zip(info, pipe.procs, strict=True):
            i["status_at_ready"] = proc_status(p.pid)
            print(
                f"[load] LocalPipeline stage_info: peak_rss_before "
                f"{i['peak_rss_before'] / MiB:.1f} MiB, peak_rss {i['peak_rss'] / MiB:.1f} MiB; "
                f"VmHWM {i['status_at_ready']['VmHWM'] / MiB:.1f} MiB "
                f"(driver ru_maxrss {driver_ru_maxrss / MiB:.1f} MiB)",
                flush=True,
            )
        port = free_port()
        gpipe = Workers(
            "ScheduleGPipe",
            [(gpipe_rank, (r, port, str(ckpt), split_at, inputs)) for r in range(2)],
        )
        eager = Workers("single-process", [(eager_worker, (str(ckpt), inputs))])
        contestants = {
            "ours": lambda n: time_ours(pipe, inputs, n),
            "gpipe": gpipe.run,
            "single_process": eager.run,
        }
        for fn in contestants.values():
            fn(WARMUP)
        names = list(contestants)
        for r in range(ROUNDS):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                elapsed, tails[name], shapes[name] = contestants[name](ITERS)
                rounds[name].append(ITERS * BATCH / elapsed)
            print(
                f"[throughput] round {r}: "
                + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rounds.items())
                + " samples/s",
                flush=True,
            )
        for i, p in zip(info, pipe.procs, strict=True):
            i["status_after_runs"] = proc_status(p.pid)
    finally:
        for w in (gpipe, eager):
            if w is not None:
                w.close()
        pipe.close()
    try:
        stage_times = pipe.stage_times()
    except Exception as e:  # informative only
        stage_times = [{"error": str(e)}]

    med = {k: statistics.median(v) for k, v in rounds.items()}
    return {
        "model": model_info,
        "split_at": split_at,
        "stage_units": [s.units for s in plan.stages],
        "pipeline_start_s": start_s,
        "driver_ru_maxrss_at_start": driver_ru_maxrss,
        "stages": stage_memory(plan, info, probes),
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
            "s_per_batch_median": {k: BATCH / v for k, v in med.items()},
            "ratio_ours_gpipe": med["ours"] / med["gpipe"],
            "ratio_ours_single_process": med["ours"] / med["single_process"],
            "output_shapes": shapes,
            "max_abs_diff_vs_gpipe": (tails["ours"] - tails["gpipe"]).abs().max().item(),
            "max_abs_diff_vs_single_process": (tails["ours"] - tails["single_process"])
            .abs()
            .max()
            .item(),
            "ours_stage_times": stage_times,
        },
    }


# ---------------------------------------------------------------------------------------------
# report


def _mb(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def _pf(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


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
    for s in st["stages"]:
        rows.append(
            (
                f"Stage {s['stage']} loading: peak RSS growth from just before the read until "
                "all its weights are resident",
                f"<= {GOAL_LOAD_RATIO} x shard",
                _mb(s["load_growth"]),
                f"shard read {_mb(s['shard_bytes'])}",
                f"{s['load_ratio']:.3f}",
                _pf(s["load_ratio"] <= GOAL_LOAD_RATIO),
            )
        )
    for s in st["stages"]:
        rows.append(
            (
                f"Stage {s['stage']}: peak RSS growth during `read_tensors` alone (lazy mmap)",
                "info",
                _mb(s["read_growth"]),
                f"shard read {_mb(s['shard_bytes'])}",
                f"{s['read_ratio']:.3f}",
                "n/a",
            )
        )
    tp = st["throughput"]
    med = tp["samples_per_s_median"]
    spb = tp["s_per_batch_median"]
    rows.append(
        (
            f"Pipelined forward, 2 stages x 1 thread, batch {BATCH}x{SEQ}, {CHUNKS} "
            f"microbatches (median of {ROUNDS} rounds)",
            f"ours / GPipe >= {GOAL_THROUGHPUT_RATIO}",
            f"{med['ours']:.2f} samples/s ({spb['ours']:.3f} s/batch)",
            f"ScheduleGPipe {med['gpipe']:.2f} samples/s ({spb['gpipe']:.3f} s/batch)",
            f"{tp['ratio_ours_gpipe']:.3f}",
            _pf(tp["ratio_ours_gpipe"] >= GOAL_THROUGHPUT_RATIO),
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
    gc_ = res["gather_cost"]
    rows.append(
        (
            "Where the gap goes: ours - GPipe, seconds per batch, vs moving one batch of logits "
            "to the driver over our gloo transport + `torch.cat` (measured alone)",
            "info",
            f"{spb['ours'] - spb['gpipe']:.3f} s/batch",
            f"gather {_mb(gc_['bytes_per_batch'])}: {gc_['s_per_batch']:.3f} s/batch",
            f"{(spb['ours'] - spb['gpipe']) / gc_['s_per_batch']:.2f}",
            "n/a",
        )
    )
    diff = max(tp["max_abs_diff_vs_gpipe"], tp["max_abs_diff_vs_single_process"])
    rows.append(
        (
            "Same logits: max abs diff of ours vs GPipe and vs single process (last 4 positions)",
            f"<= {GOAL_MAX_DIFF:g}",
            f"{tp['max_abs_diff_vs_gpipe']:.3g} / {tp['max_abs_diff_vs_single_process']:.3g}",
            "-",
            "-",
            _pf(diff <= GOAL_MAX_DIFF),
        )
    )
    return rows


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    st = res["stages"]
    tp = st["throughput"]
    mi = st["model"]
    p0 = res["plan"]["trace_false"]
    pm = res["parallel_matmul"]
    rows = _table(res)
    by_round = "; ".join(
        f"{k}: {', '.join(f'{v:.2f}' for v in vals)}"
        for k, vals in tp["samples_per_s_by_round"].items()
    )
    times = tp["ours_stage_times"]
    stage_times = ", ".join(
        f"stage {k} compute {t.get('compute_s', float('nan')):.2f} s / wait "
        f"{t.get('wait_s', float('nan')):.2f} s"
        for k, t in enumerate(times)
    )
    s_rows = st["stages"]
    runtime = "; ".join(
        f"stage {s['stage']}: `peak_rss_before` {_mb(s['runtime_peak_rss_before'])}, "
        f"`peak_rss` {_mb(s['runtime_peak_rss'])}, "
        f"its real VmHWM {_mb(s['runtime_true_peak_at_ready'])}"
        for s in s_rows
    )
    lines = [
        "# pipeline_core benchmark",
        "",
        f"Generated by `python -m bench.bench_core` on {res['date']} in {res['total_s']:.0f} s.",
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
        "own memory, which `echo 5 > /proc/self/clear_refs` resets to the current RSS.",
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
        f"and planned with `equal_size(2)` (split at `{st['split_at']}`).  A stage process first "
        "rebuilds the skeleton and traces it (`torch.export`, transient memory), then reads its "
        "tensors.  To isolate the read, a probe process runs the same `build_stage` and, "
        "between the trace and the read, resets VmHWM to the current RSS; after `build_stage` "
        "returns it touches every weight (safetensors returns lazy mmap views, so a read alone "
        "faults in almost nothing; the pages come in on the first forward).  *Growth* = VmHWM "
        "after touching - RSS just before the read; the goal is growth / bytes the stage read "
        "<= 1.25.  The resident weights are file-backed page-cache pages (RssFile grew by "
        + ", ".join(_mb(s["resident_file_growth"]) for s in s_rows)
        + ", RssAnon by "
        + ", ".join(_mb(s["resident_anon_growth"]) for s in s_rows)
        + "), so they are shared with the page cache and are not a private copy.  "
        "Peak of skeleton + trace before the read: "
        + ", ".join(_mb(s["trace_peak"]) for s in s_rows)
        + ".",
        "",
        "What `LocalPipeline.stage_info` reports for the real stage processes is *not* usable "
        f"as a loading measurement: {runtime}; the driver's own `ru_maxrss` when it started "
        f"the stages was {_mb(st['driver_ru_maxrss_at_start'])}, while a stage process's own "
        "peak at the point where `peak_rss_before` is read (after imports, before "
        "`build_stage`) is "
        + _mb(s_rows[0]["probe"]["start"]["VmHWM"])
        + " (VmHWM in the probe).  `_peak_rss()` in "
        "`pipeline_core/local.py` reads `ru_maxrss`, so both numbers are at least the driver's "
        "peak and `peak_rss - peak_rss_before` says nothing about the stage.",
        "",
        f"**Throughput.** All contestants use the same checkpoint, the same split "
        f"(`{st['split_at']}`), 1 thread per process, the same batch ({BATCH} x {SEQ} tokens, "
        f"all-ones attention mask) cut into {CHUNKS} microbatches, and run in the same session: "
        f"{WARMUP} warm-up iterations each, then {ROUNDS} rounds of {ITERS} timed iterations, "
        "rotating the order every round (idle contestants block on a queue or a socket).  "
        "Ours: `LocalPipeline(plan, threads_per_stage=1)`; the driver (a third process) times "
        f"`pipe(input_ids=..., attention_mask=..., chunks={CHUNKS})`, which scatters inputs and "
        f"gathers the full logits ({BATCH}x{SEQ}x{MID_LLAMA['vocab_size']} fp32 = "
        f"{BATCH * SEQ * MID_LLAMA['vocab_size'] * 4 / MiB:.0f} MiB per batch) back over gloo. "
        'GPipe: 2 processes with `init_process_group("gloo")`, each loading the checkpoint '
        "with `from_pretrained`, `pipeline()` on a wrapper returning logits only "
        f"(`use_cache=False`), `pipe.build_stage(rank)`, `ScheduleGPipe(stage, "
        f"n_microbatches={CHUNKS})`, `schedule.step(...)` under `torch.no_grad()`, timed "
        "between two barriers; its logits stay on the last rank (no gather).  Single process: "
        "the whole model in one process, full batch.  samples/s = iterations x batch / seconds; "
        f"per round: {by_round}.  Our stages' totals over all runs (warm-up included): "
        f"{stage_times}.  The last stage dominates (it holds the {MID_LLAMA['vocab_size']}-"
        "word head: `equal_size` balances bytes, and the "
        + _mb(MID_LLAMA["vocab_size"] * MID_LLAMA["hidden_size"] * 4)
        + " embedding table on stage 0 "
        "costs no compute) and both pipelines are bound by it; ours additionally ships every "
        "microbatch's logits to the driver and concatenates them there, which GPipe does not "
        "(the 'where the gap goes' row compares the gap with that transfer measured alone). "
        "After the timed runs the last stage process held "
        + _mb(s_rows[-1]["runtime_status_after_runs"]["VmRSS"])
        + " RSS ("
        + _mb(s_rows[-1]["runtime_status_after_runs"]["RssAnon"])
        + " anonymous; peak "
        + _mb(s_rows[-1]["runtime_status_after_runs"]["VmHWM"])
        + "): the logits buffers of in-flight sends plus allocator caching (a separate check of "
        "16 consecutive calls saw it cycle between about 450 and 830 MiB anonymous, not "
        "grow).",
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
    args = ap.parse_args()
    if args.plan_child:
        plan_child(args.plan_child, args.trace)
        return

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"machine": machine()}
    res["parallel_matmul"] = parallel_matmul_check()
    res["gather_cost"] = gather_cost_check()
    print(
        f"[machine] {res['machine']}; parallel matmul {res['parallel_matmul']}; "
        f"logits gather {res['gather_cost']}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench_core_") as d:
        tmp = Path(d)
        res["plan"] = bench_plan(tmp)
        res["stages"] = bench_stages(tmp)
    res["total_s"] = time.perf_counter() - t0
    res["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "core.json").write_text(json.dumps(_jsonable(res), indent=2) + "\n")
    (out / "core.md").write_text(markdown(res))
    print(f"wrote {out / 'core.json'} and {out / 'core.md'} ({res['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
