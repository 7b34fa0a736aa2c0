"""Reliability report (issue: reliability and security).

Run from the repository root::

    python -m bench.bench_reliability

Writes ``bench/results/reliability.json`` and ``bench/results/reliability.md``.  A coordinator
(``--worker-timeout 2``) and 4 workers (3 stages + 1 spare) run as processes on this machine
with a small random Llama, and we measure

1. **recovery from a killed worker**: 24 streaming requests (48 tokens, half greedy, half
   seeded sampling) are in flight when the stage-1 worker gets SIGKILL; every stream must
   finish token-identical to an undisturbed run; reported: the time from the kill to the model
   being ready again, and the longest stall any client saw between two tokens.
2. **load**: 200 concurrent requests of mixed lengths (8-64 new tokens, prompts of 3-40
   tokens), all complete and equal to their undisturbed tokens; peak RSS of every process.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc
import torch

from bench.harness import code_state, machine, proc_status, write_results
from pipeserve.v1 import pipeserve_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _run(fleet: Any, jobs: list[tuple[list[int], int, int]], during: Any = None) -> dict:
    """Stream every (prompt, new tokens, seed) job at once; returns tokens and stalls."""
    outs: list[list[int]] = [[] for _ in jobs]
    gaps = [0.0] * len(jobs)
    errors: list = []

    def one(i: int) -> None:
        prompt, new, seed = jobs[i]
        sampling = pb.SamplingParameters(ignore_eos=True)
        if seed:
            sampling = pb.SamplingParameters(ignore_eos=True, temperature=0.9, top_k=50, seed=seed)
        req = pb.GenerateRequest(
            model="m", token_ids=pb.TokenIds(ids=prompt), max_new_tokens=new, sampling=sampling
        )
        last = time.perf_counter()
        try:
            for r in fleet.inference.Generate(req, timeout=600):
                now = time.perf_counter()
                if r.token_ids and outs[i]:
                    gaps[i] = max(gaps[i], now - last)
                last = now
                outs[i].extend(r.token_ids)
        except grpc.RpcError as e:
            errors.append(f"{e.code().name}: {e.details()}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    if during is not None:
        while sum(map(len, outs)) < 2 * len(jobs):
            time.sleep(0.005)
        during()
    for t in threads:
        t.join(900)
    return {
        "outs": outs,
        "errors": errors,
        "wall_s": time.perf_counter() - t0,
        "max_stall_s": max(gaps),
    }


def bench(tmp: Path) -> dict[str, Any]:
    from tests.models import lm_model, save_hf
    from tests.test_recovery import Fleet

    save_hf(lm_model("llama"), tmp / "m")
    fleet = Fleet(tmp)
    res: dict[str, Any] = {}
    try:
        for _ in range(4):
            fleet.add_worker()
        list(
            fleet.admin.LoadModel(
                pb.LoadModelRequest(
                    name="m", checkpoint=str(tmp / "m"), policy=pb.SplitPolicy(equal_size=3)
                ),
                timeout=300,
            )
        )
        jobs = [([1 + i, 2 + i % 7, 3, 4 + i % 5], 48, (i + 1) * (i % 2)) for i in range(24)]
        base = _run(fleet, jobs)
        victim = fleet.process_of_stage(1)
        killed: list[float] = []
        epoch = fleet.model().epoch

        def kill() -> None:
            killed.append(time.perf_counter())
            victim.kill()
            threading.Thread(target=watch, daemon=True).start()

        ready_at: list[float] = []

        def watch() -> None:
            while True:
                m = fleet.model()
                if m.state == pb.MODEL_STATE_READY and m.epoch > epoch:
                    ready_at.append(time.perf_counter())
                    return
                time.sleep(0.02)

        hit = _run(fleet, jobs, kill)
        res["recovery"] = {
            "requests": len(jobs),
            "complete": sum(len(o) == 48 for o in hit["outs"]),
            "identical_to_undisturbed": sum(
                a == b for a, b in zip(hit["outs"], base["outs"], strict=True)
            ),
            "errors": hit["errors"],
            "kill_to_ready_s": (ready_at[0] - killed[0]) if ready_at else None,
            "max_client_stall_s": hit["max_stall_s"],
            "undisturbed_max_stall_s": base["max_stall_s"],
            "worker_timeout_s": 2.0,
        }
        print("[recovery]", res["recovery"], flush=True)
        g = torch.Generator().manual_seed(0)
        load_jobs = []
        for _ in range(200):
            n = int(torch.randint(3, 41, (1,), generator=g))
            prompt = torch.randint(1, 95, (n,), generator=g).tolist()
            load_jobs.append((prompt, int(torch.randint(8, 65, (1,), generator=g)), 0))
        alone = _run(fleet, load_jobs[:20])
        load = _run(fleet, load_jobs)
        rss = {"coordinator": proc_status(fleet.coordinator.pid).get("VmHWM", 0)}
        for port, p in fleet.workers.items():
            if p.poll() is None:
                rss[f"worker:{port}"] = proc_status(p.pid).get("VmHWM", 0)
        res["load"] = {
            "requests": len(load_jobs),
            "complete": sum(len(o) == j[1] for o, j in zip(load["outs"], load_jobs, strict=True)),
            "first_20_equal_to_running_alone": load["outs"][:20] == alone["outs"],
            "errors": load["errors"][:5],
            "wall_s": load["wall_s"],
            "tokens": sum(map(len, load["outs"])),
            "peak_rss_bytes": rss,
        }
        print("[load]", {k: v for k, v in res["load"].items() if k != "peak_rss_bytes"}, flush=True)
    finally:
        fleet.close()
    return res


def markdown(res: dict[str, Any]) -> str:
    r, ld, m = res["recovery"], res["load"], res["machine"]
    ok_r = r["complete"] == r["requests"] == r["identical_to_undisturbed"] and not r["errors"]
    ok_l = ld["complete"] == ld["requests"] and ld["first_20_equal_to_running_alone"]
    rss = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in ld["peak_rss_bytes"].items())
    return "\n".join(
        [
            "# Reliability report",
            "",
            f"Machine: {m['cpu']}, {m['usable_cores']} usable cores.  Coordinator + 4 workers (3 "
            "stages + 1 spare) as processes, random Llama (hidden 32, 4 layers).  "
            f"Date: {res['date']}.",
            "",
            "| metric | goal | measured | |",
            "|---|---|---|---|",
            f"| SIGKILL a stage worker with {r['requests']} streams in flight, a spare available "
            f"| every stream complete and token-identical | {r['complete']}/{r['requests']} "
            f"complete, {r['identical_to_undisturbed']}/{r['requests']} identical, "
            f"{len(r['errors'])} errors | {'PASS' if ok_r else 'FAIL'} |",
            f"| recovery time, kill -> model ready (worker timeout {r['worker_timeout_s']:.0f} s) "
            f"| report | {r['kill_to_ready_s']:.2f} s; longest client stall "
            f"{r['max_client_stall_s']:.2f} s (undisturbed {r['undisturbed_max_stall_s']:.2f} s) "
            "| info |",
            f"| {ld['requests']} concurrent requests, mixed lengths | all complete and correct, "
            f"memory bounded | {ld['complete']}/{ld['requests']} complete, {ld['tokens']} tokens "
            f"in {ld['wall_s']:.1f} s; first 20 equal to running alone: "
            f"{ld['first_20_equal_to_running_alone']}; peak RSS: {rss} | "
            f"{'PASS' if ok_l else 'FAIL'} |",
            "",
            "Recovery = missing heartbeats for the worker timeout, survivors abandon the broken "
            "ring, the spare loads the lost stage, all stages re-form under a new epoch, and the "
            "coordinator replays each stream with the tokens already sent (seeded sampling "
            "continues: token k's draw depends only on the seed and k).",
            "",
        ]
    )


def main() -> None:
    import tempfile

    torch.set_num_threads(1)
    res: dict[str, Any] = {"machine": machine(), "code": code_state()}
    with tempfile.TemporaryDirectory(prefix="bench_rel_") as d:
        res.update(bench(Path(d)))
    res["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(write_results(RESULTS, "reliability", res, markdown))


if __name__ == "__main__":
    main()
