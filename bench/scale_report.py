"""The markdown table of ``bench/bench_scale.py``'s results (``bench/results/scale.md``)."""

from __future__ import annotations

from typing import Any


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def cluster_rows(row: Any, m: dict[str, Any], tokens: int) -> None:
    """The gRPC cluster's rows (``pipeserve local DIR --stages 4 --once``), when measured."""
    c, name, single = m.get("cluster"), m["model"], m["single"]
    if not c:
        return
    if c.get("rc") != 0:
        row(
            f"{name}: gRPC cluster, `pipeserve local --stages 4 --once`",
            "completes",
            f"rc {c.get('rc')}: {c.get('error', '')[-300:]}",
            "-",
            "-",
            False,
        )
        return
    distinct = len({t for toks in c["tokens"] for t in toks})
    row(
        f"{name}: gRPC cluster on this host, `pipeserve local DIR --stages 4 --once "
        f"--max-new-tokens {tokens}` (coordinator + 4 stage workers as processes; its "
        "self-check vs single-process transformers generate, 3 prompts)",
        "completes; tokens equal",
        f"tokens {'equal' if c['equal'] else 'DIFFER'} ({distinct} distinct ids over 3 prompts)",
        "HF generate in the same command, model freed before the workers start",
        "-",
        c["equal"],
    )
    workers = [p for p in c["procs"] if p["process"].split()[1:2] == ["worker"]]
    total = sum(p["peak"] for p in workers)
    coord = next((p["peak"] for p in c["procs"] if p["process"].split()[1:2] == ["coordinator"]), 0)
    row(
        f"{name}: gRPC cluster: peak RSS of each stage worker / stage bytes; the most the "
        "host held at once (every process, current RSS polled at 2 Hz) / checkpoint bytes",
        "report",
        f"workers {', '.join(_gib(p['peak']) for p in workers)} (sum {_gib(total)}); "
        f"coordinator {_gib(coord)}; at once {_gib(c['max_total_rss'])}",
        f"stages {', '.join(_gib(b) for b in m['stage_bytes'])}; checkpoint "
        f"{_gib(m['checkpoint_bytes'])}",
        f"{total / sum(m['stage_bytes']):.2f}x stage bytes (beyond the weights: "
        f"{_gib((total - sum(m['stage_bytes'])) / len(workers))} per worker: runtime, KV cache, "
        "buffers); at once "
        f"{c['max_total_rss'] / m['checkpoint_bytes']:.2f}x checkpoint",
        None,
    )
    row(
        f"{name}: gRPC cluster: load (LoadModel, cold page cache), time to first token and "
        "seconds per token of each streamed Generate",
        "report",
        f"load {c['load_s']:.1f} s; first token "
        f"{', '.join(f'{t:.2f}' for t in c['first_token_s'])} s; "
        f"{', '.join(f'{t:.2f}' for t in c['s_per_token'])} s/token",
        f"single process: from_pretrained + first token "
        f"{single['load_s'] + single['ttft_s']:.1f} s, {single['s_per_token']:.2f} s/token",
        f"{min(c['s_per_token']) / single['s_per_token']:.2f}x per token (best prompt)"
        + (f"; load average {c['loadavg'][0]:.0f}-{c['loadavg'][1]:.0f}" if "loadavg" in c else ""),
        None,
    )


def report(res: dict[str, Any]) -> str:
    """The markdown results table (metric, goal, measured, baseline, ratio, verdict)."""
    rows = []

    def row(metric: str, goal: str, measured: str, base: str, ratio: str, ok: bool | None):
        verdict = "info" if ok is None else "PASS" if ok else "FAIL"
        rows.append(f"| {metric} | {goal} | {measured} | {base} | {ratio} | {verdict} |")

    for m in res["models"]:
        name, fmt = m["model"], m["format"]
        ratios = [s["ratio"] for s in m["stages"]]
        row(
            f"{name} ({fmt}, {m['dtype']}): stage peak RSS growth while loading / stage bytes, "
            "each of 4 stages in its own process",
            "<= 1.10x",
            ", ".join(f"{r:.3f}x" for r in ratios)
            + f" (stages {', '.join(_gib(b) for b in m['stage_bytes'])})",
            "-",
            f"worst {max(ratios):.3f}x",
            max(ratios) <= 1.10,
        )
        disk, single, run = m["disk"], m["single"], m["run"]
        bound = m["checkpoint_bytes"] / (disk["bytes"] / disk["seconds"])
        loads = [s["load_s"] for s in m["stages"]]
        row(
            f"{name}: load seconds (each stage alone, cold page cache) vs the disk's read "
            "bandwidth",
            "report",
            f"stages {', '.join(f'{t:.1f}' for t in loads)} s (sum {sum(loads):.1f} s)",
            f"{_gib(m['checkpoint_bytes'])} at {disk['gb_per_s']:.2f} GB/s = {bound:.1f} s; "
            f"single-process from_pretrained {single['load_s']:.1f} s",
            f"{sum(loads) / bound:.2f}x the disk bound",
            None,
        )
        if run.get("rc") == 0:
            total = sum(run["peaks"])
            row(
                f"{name}: `pipeserve run --stages 4` (default flags) vs single-process "
                f"from_pretrained + generate, {res['tokens']} greedy tokens",
                "completes; tokens equal",
                f"tokens {'equal' if run['equal'] else 'DIFFER'} ({run['tokens']}; "
                f"{len(set(run['tokens']))} distinct)",
                f"HF {single['tokens']} ({single['dtype']})",
                "-",
                run["equal"],
            )
            row(
                f"{name}: `pipeserve run` peak RSS of every process (driver = stage 0 + "
                "scheduler) / checkpoint bytes",
                "report",
                f"{', '.join(_gib(p) for p in run['peaks'] if p > 2**28)}; sum {_gib(total)}",
                f"single process {_gib(single['peak'])}; checkpoint {_gib(m['checkpoint_bytes'])}",
                f"{total / m['checkpoint_bytes']:.2f}x "
                f"(single {single['peak'] / m['checkpoint_bytes']:.2f}x)",
                None,
            )
            row(
                f"{name}: time to first token (from the command's start: plan, load, prefill) "
                "and seconds per token",
                "report",
                f"{run['first_token_s']:.1f} s, {run['s_per_token']:.2f} s/token",
                f"single process {single['load_s'] + single['ttft_s']:.1f} s, "
                f"{single['s_per_token']:.2f} s/token",
                f"{run['s_per_token'] / single['s_per_token']:.2f}x per token",
                None,
            )
        else:
            row(
                f"{name}: `pipeserve run --stages 4`",
                "completes",
                f"rc {run.get('rc')}: {run.get('error', '')[-300:]}",
                "-",
                "-",
                False,
            )
        cluster_rows(row, m, res["tokens"])
        p = m["plan"]
        row(
            f"{name}: `pipeserve plan DIR --stages 4` (default: balanced, profiled; cold "
            "profile cache), own process",
            "< 15 s, < 1 GiB; dtype the checkpoint's",
            f"{p['seconds']:.1f} s, {_gib(p['peak'])}, dtype {p['dtype']}",
            "-",
            "-",
            p["seconds"] < 15 and p["peak"] < 2**30 and p["dtype"] == m["dtype"],
        )
        t = m.get("plan_traced")
        if t:
            row(
                f"{name}: the same with `--trace` (stage I/O recorded by torch.export)",
                "report",
                f"{t['seconds']:.1f} s, {_gib(t['peak'])}",
                "-",
                "-",
                None,
            )
    p = res["plan_70b"]
    row(
        "Llama-2-70B config (hidden 8192, 80 layers, 64 heads, 8 KV heads, bf16): "
        "`pipeserve plan --stages 4 --worker-memory 24GiB`, own process",
        "< 30 s, < 1 GiB; says the workers needed",
        f"{p['seconds']:.1f} s, {_gib(p['peak'])}, dtype {p['dtype']}; '{p['workers_needed']}'",
        "-",
        "-",
        p["seconds"] < 30 and p["peak"] < 2**30 and bool(p["workers_needed"]),
    )
    t = p.get("traced")
    if t:
        row(
            "Llama-2-70B config: the same with `--trace`",
            "report",
            f"{t['seconds']:.1f} s, {_gib(t['peak'])}",
            "-",
            "-",
            None,
        )
    notes = []
    for m in res["models"]:
        toks = m["run"].get("tokens") or []
        if toks and len(set(toks)) == 1:
            notes.append(
                f"{m['model']}: both decoders repeat one id (the random weights copy the last "
                "input token through the residual stream and the tied head), so the equality "
                "there checks less than the Llama row, whose tokens vary."
            )
    if any(m.get("cluster") for m in res["models"]):
        notes.append(
            "gRPC-cluster rows: the host holds the single-process reference first (the "
            "`local` process's peak, freed before the workers start), then the stages; 'at "
            "once' is the most all processes held together. Bloom-7b1's input embedding is "
            "tied to its head, so the last stage holds a second copy of the 250880x4096 table "
            "(1.96 GB; the plan's tied-weights line says so): hence 1.30x the checkpoint. "
            "These rows ran beside other sessions' tests (load average in the row where "
            "recorded; 11-15 for Llama-7B); their per-token ratios compare with single-process "
            "figures measured earlier: information, not a goal."
        )
    notes.append(
        "Plans with tracing spend most of their time in `torch.export` of the whole model on "
        "fake tensors (44 of 57 s for Bloom-7b1 measured separately); `pipeserve run` and "
        "`admin load` plan generation without it. bf16 layers are estimated from FLOPs here "
        "(a run would take minutes without bf16 matmuls), as the plan's cost column says. "
        "Seconds are from a shared 2-core VM (load average 5-16 from other sessions); the "
        "disk figure is read after evicting the files' pages."
    )
    h = res["host"]
    return "\n".join(
        [
            "# Scale report: 7B-shaped checkpoints on one host",
            "",
            f"Machine: {h['cpu']}, {h['cpus']} cores, 24 GiB RAM.  Date: {h['date']} UTC.  "
            "Random weights (bench_scale's note), checkpoints under /tmp/pipeserve-scale.",
            "",
            "| metric | goal | measured | baseline | ratio | |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            *notes,
            "",
        ]
    )
