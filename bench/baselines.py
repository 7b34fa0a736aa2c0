"""What pipeline_core's throughput is measured against, and how: ``torch.distributed.pipelining``
``ScheduleGPipe`` ranks and a single-process eager model as worker processes
(:class:`Workers`), and timers for ``LocalPipeline`` (:func:`time_ours`,
:func:`time_ours_stream`) on the same batches (``BATCH`` rows of ``SEQ`` tokens, ``CHUNKS``
microbatches).  Used by :mod:`bench.core_stages` and :mod:`bench.bench_balance`.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

WARMUP, ITERS, ROUNDS = 2, 4, 5

BATCH, SEQ, CHUNKS = 8, 128, 4


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
