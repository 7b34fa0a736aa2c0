"""Benchmark the gRPC path (issue: control plane).

Run from the repository root::

    python -m bench.bench_grpc

Writes ``bench/results/grpc.json`` and ``bench/results/grpc.md``.  A coordinator and 2 stage
workers run as separate processes on this machine (1 torch thread each) with a small random
Llama (hidden 64, 4 layers, vocab 1000), and we measure

1. **per-token overhead of the gRPC path**: batch-1 greedy generation of 256 tokens through
   client -> coordinator -> stage-0 worker -> stream back, against ``pipeline_core`` called
   directly (``LocalGenerator``, the same 2 stages, no gRPC); overhead per token = difference
   of the per-token times (median of 5 alternating rounds).  Goal < 0.5 ms.
2. **concurrent streaming clients**: N Generate streams opened at once (asyncio client, one
   channel), 8 tokens each, every stream must end with its 8 tokens and finish reason
   (nothing lost).  Goal: N >= 1000.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import torch

from bench.harness import code_state, machine, write_results
from tests.cluster import Cluster

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
NEW = 256
STREAMS = [250, 1000]


def build(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="200KB")
    return path


def start_cluster(ckpt: Path, logs: Path) -> Cluster:
    """A coordinator and 2 workers (1 torch thread each) with ``ckpt`` loaded as "m" over
    2 stages (equal_size), started by the tests' harness."""
    cluster = Cluster(
        logs, workers=[[], []], env={"OMP_NUM_THREADS": "1"}, kv_budget=0, metrics=False
    )
    try:
        cluster.ckpt = ckpt.parent
        cluster.load("m", ckpt.name, stages=2)
    except BaseException:
        cluster.close()
        raise
    return cluster


def generate(cluster: Cluster, prompt: list[int], new: int) -> list[int]:
    from pipeserve.v1 import pipeserve_pb2 as pb

    ignore_eos = pb.SamplingParameters(ignore_eos=True)
    return cluster.generate("m", prompt, new, timeout=600, sampling=ignore_eos)


def overhead(cluster: Cluster, ckpt: Path, rounds: int = 5) -> dict[str, Any]:
    from pipeline_core import LocalGenerator, ModelSource, Policy, SamplingParams, make_plan

    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    plan = make_plan(ModelSource(checkpoint=str(ckpt)), Policy.equal_size(2), trace=False)
    grpc_t, direct_t = [], []
    with LocalGenerator(plan) as gen:
        params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
        same = gen.generate([prompt], params)[0] == generate(cluster, prompt, NEW)
        for _ in range(rounds):
            t0 = time.perf_counter()
            gen.generate([prompt], params)
            direct_t.append((time.perf_counter() - t0) / NEW)
            t0 = time.perf_counter()
            generate(cluster, prompt, NEW)
            grpc_t.append((time.perf_counter() - t0) / NEW)
    g, d = statistics.median(grpc_t), statistics.median(direct_t)
    return {
        "grpc_s_per_token": g,
        "direct_s_per_token": d,
        "overhead_s_per_token": g - d,
        "same_tokens": same,
        "rounds": rounds,
        "new_tokens": NEW,
    }


async def _streams(address: str, n: int, new: int = 8) -> dict[str, Any]:
    from pipeserve.v1 import pipeserve_pb2 as pb
    from pipeserve.v1 import pipeserve_pb2_grpc as pbg

    async with grpc.aio.insecure_channel(address) as ch:
        stub = pbg.InferenceStub(ch)
        started = 0
        t0 = time.perf_counter()

        async def one(i: int) -> tuple[int, bool, float]:
            nonlocal started
            req = pb.GenerateRequest(
                model="m",
                token_ids=pb.TokenIds(ids=[1 + i % 900, 2, 3]),
                max_new_tokens=new,
                sampling=pb.SamplingParameters(ignore_eos=True),
            )
            got, finished, first = 0, False, 0.0
            started += 1
            async for r in stub.Generate(req, timeout=600):
                if not first and r.token_ids:
                    first = time.perf_counter() - t0
                got += len(r.token_ids)
                finished |= r.finish_reason != pb.FINISH_REASON_UNSPECIFIED
            return got, finished, first

        results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
        wall = time.perf_counter() - t0
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    ok = [r for r in results if not isinstance(r, BaseException)]
    complete = sum(1 for got, fin, _ in ok if got == new and fin)
    firsts = sorted(f for _, _, f in ok)
    return {
        "streams": n,
        "complete": complete,
        "errors": errors[:5],
        "n_errors": len(errors),
        "wall_s": wall,
        "tokens": sum(g for g, _, _ in ok),
        "first_token_s_median": statistics.median(firsts) if firsts else None,
    }


def markdown(res: dict[str, Any]) -> str:
    o = res["overhead"]
    m = res["machine"]
    rows = [
        f"| gRPC path overhead per token (client -> coordinator -> worker -> back) | < 0.5 ms "
        f"| {o['overhead_s_per_token'] * 1e3:.3f} ms ({o['grpc_s_per_token'] * 1e3:.2f} vs "
        f"{o['direct_s_per_token'] * 1e3:.2f} ms direct) | "
        f"{'PASS' if o['overhead_s_per_token'] < 5e-4 else 'FAIL'} |"
    ]
    for s in res["streams"]:
        ok = s["complete"] == s["streams"]
        rows.append(
            f"| {s['streams']} concurrent streaming clients, 8 tokens each | all complete "
            f"(goal >= 1000 streams) | {s['complete']}/{s['streams']} complete, "
            f"{s['n_errors']} errors, {s['wall_s']:.1f} s, first token median "
            f"{(s['first_token_s_median'] or 0):.2f} s | {'PASS' if ok else 'FAIL'} |"
        )
    return "\n".join(
        [
            "# gRPC path benchmark",
            "",
            f"Machine: {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']}.  "
            "Coordinator + 2 workers as processes on this machine, a random Llama (hidden 64, 4 "
            f"layers, vocab 1000).  Date: {res['date']}.",
            "",
            "| metric | goal | measured | |",
            "|---|---|---|---|",
            *rows,
            "",
            f"Per-token times are medians of {o['rounds']} alternating rounds of {o['new_tokens']} "
            f"tokens, batch 1; the two paths gave {'the same' if o['same_tokens'] else 'DIFFERENT'}"
            " tokens.  Streams: one asyncio channel, all calls started at once; the stage-0 "
            "scheduler batches them (KV budget 65536 tokens, 256 sequences at once, the rest "
            "queue).",
            "",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    res: dict[str, Any] = {"machine": machine(), "code": code_state()}
    with tempfile.TemporaryDirectory(prefix="bench_grpc_") as d:
        ckpt = build(Path(d) / "llama")
        cluster = start_cluster(ckpt, Path(d))
        try:
            res["overhead"] = overhead(cluster, ckpt)
            print("[overhead]", res["overhead"], flush=True)
            res["streams"] = []
            for n in STREAMS:
                res["streams"].append(asyncio.run(_streams(cluster.address, n)))
                print("[streams]", res["streams"][-1], flush=True)
        finally:
            cluster.close()
    res["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    out = Path(args.out)
    print(write_results(out, "grpc", res, markdown))


if __name__ == "__main__":
    main()
