"""Write BENCHMARKS.md from bench/results/*.json and *.md (run after the benchmarks).

    python -m bench.report      # `make bench` runs it last

Every benchmark's results table (metric, goal, measured, baseline, ratio, pass/fail) is
collected under one roof with the machine it ran on, a goals-at-a-glance summary, and plots
(throughput vs concurrent requests, per-token latency vs number of stages).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "BENCHMARKS.md"
ORDER = [
    "core",
    "balance",
    "generate",
    "decode",
    "alternation",
    "huge_pages",
    "compiled_decode",
    "generate_16core",
    "generate_gpu",
    "grpc",
    "gateway",
    "reliability",
    "container",
    "scale",
]
SCRIPTS = {
    "generate_16core": "bench_generate.py --name generate_16core",
    "generate_gpu": "bench_generate.py --device cuda",
    "container": "../tests/test_container.py",
}
BASELINES = {
    "core": "`torch.distributed.pipelining` ScheduleGPipe, same split; load peak vs shard bytes",
    "balance": "one process with the whole model; GPipe split at the middle",
    "generate": "HF `generate` in one process; PiPPy-style recompute; the model on 1 stage",
    "decode": "HF `generate` in one process, interleaved in the same rounds, each side on 3 "
    "fresh allocations of its weights; one gloo hop measured alone",
    "alternation": "the same 12 decoder layers back to back in one thread (no pipeline code in "
    "any layout)",
    "huge_pages": "the same plan's stages with their weights in ordinary pages, and HF `generate` "
    "on both layouts, interleaved in every round",
    "compiled_decode": "the same in-process stage(s) eager (`compile_decode` off), run alternately "
    "in the same rounds",
    "generate_16core": "as `generate`, on the 16-core host of the GPU machine (CPU only, one "
    "thread per process, each on its own core)",
    "generate_gpu": "HF `generate` in one process on the same GPU; PiPPy-style recompute on it; "
    "the model on 1 stage",
    "grpc": "`pipeline_core` called directly on the same local stages",
    "gateway": "the `pipeserve.v1` gRPC client on the same cluster",
    "reliability": "the same requests run undisturbed / alone",
    "container": "single-process `generate`; the CI budget for the container test",
    "scale": "single-process `from_pretrained` + `generate` on the same checkpoint; the disk's "
    "read bandwidth measured in the same run",
}


def _table(md: str) -> list[str]:
    """The first markdown table of a results file."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| metric"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


FULL = {"decode"}
"""Benchmarks whose every table goes into BENCHMARKS.md (not only the first)."""


def _tables(md: str) -> list[str]:
    """Every markdown table of a results file with the heading above each after the first."""
    lines, out, heading = md.splitlines(), [], ""
    i = 0
    while i < len(lines):
        if lines[i].startswith("## "):
            heading = lines[i].removeprefix("## ")
        if lines[i].startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            if out:
                out += ["", f"**{heading}**", ""]
            out += lines[i:j]
            i = j
            continue
        i += 1
    return out


def _goal_rows(table: list[str]) -> list[tuple[str, str]]:
    out = []
    for row in table[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        verdict = cells[-1]
        if verdict in ("PASS", "FAIL"):
            out.append((cells[0], verdict))
    return out


def _plots() -> list[str]:
    gen = RESULTS / "generate.json"
    if not gen.is_file():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(gen.read_text())
    made = []
    tp = res["throughput"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("one_stage", "1 stage"), ("two_stages", "2 stages")):
        runs = tp[key]["runs"]
        xs = sorted(int(k) for k in runs)
        ax.plot(xs, [runs[str(x)]["tokens_per_s"] for x in xs], marker="o", label=label)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("tokens/s")
    ax.set_title("generation throughput vs concurrent requests (CPU, 1 thread/stage)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "throughput_vs_concurrency.png", dpi=100)
    plt.close(fig)
    made.append("throughput_vs_concurrency.png")
    lat = res.get("latency_by_stages")
    if lat:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = sorted(int(k) for k in lat)
        ax.plot(xs, [lat[str(x)] * 1e3 for x in xs], marker="o", label="pipeserve")
        hf = res["latency"]["hf_s_per_token"] * 1e3
        ax.axhline(hf, color="grey", linestyle="--", label="HF generate, 1 process")
        ax.set_xticks(xs)
        ax.set_xlabel("stages")
        ax.set_ylabel("ms per token (batch 1)")
        ax.set_title("per-token latency vs number of stages")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "latency_vs_stages.png", dpi=100)
        plt.close(fig)
        made.append("latency_vs_stages.png")
    return made


def build(plots: bool = True) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench.report` from `bench/results/` (`make bench` runs every "
        "benchmark, then this). Each row's baseline was measured in the same run on the same "
        "machine; targets are ratios, never wall-clock asserts. CPU results from the 2-core "
        "build VM. "
        + (
            "`generate_16core` and `generate_gpu`: the generation benchmark on the host a "
            "session was lent (16 cores, one H200), on its CPU and on its GPU; with one GPU "
            "the stages share it and send through host memory, so the NCCL path between GPUs "
            "(tests/test_gpu.py) still waits for a machine with two."
            if (RESULTS / "generate_gpu.md").is_file()
            else "No GPU was available to these sessions: GPU figures are still to be measured."
        ),
        "",
        "## Goals at a glance",
        "",
        "| benchmark | metric | result |",
        "|---|---|---|",
    ]
    sections = []
    for name in ORDER:
        md_path = RESULTS / f"{name}.md"
        if not md_path.is_file():
            continue
        md = md_path.read_text()
        table = _table(md)
        for metric, verdict in _goal_rows(table):
            short = re.sub(r"\s+", " ", metric)
            lines.append(f"| {name} | {short} | {verdict} |")
        machine = next((ln for ln in md.splitlines() if ln.startswith("Machine")), "")
        sections += [
            f"## {name} (`bench/{SCRIPTS.get(name, f'bench_{name}.py')}`)",
            "",
            f"Baselines: {BASELINES[name]}. Full notes: `bench/results/{name}.md`.",
            "",
            machine,
            "",
            *(_tables(md) if name in FULL else table),
            "",
        ]
    lines += ["", *sections]
    made = _plots() if plots else sorted(p.name for p in RESULTS.glob("*.png"))
    if made:
        lines += ["## Plots", ""] + [f"![{p}](bench/results/{p})" for p in made] + [""]
    return "\n".join(lines)


def main() -> None:
    OUT.write_text(build())
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
