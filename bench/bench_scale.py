"""Big models for real: 7B-shaped bf16 checkpoints on one host, and plans of 7B / 70B shapes.

Run: ``python -m bench.bench_scale`` (``make bench``; not in CI: it writes ~28 GB and needs
~16 GiB of memory).  The checkpoints are written once under ``--dir`` (default
``/tmp/pipeserve-scale``) with random weights: a Bloom-7b1 shape as 7 ``.bin`` shards +
``pytorch_model.bin.index.json`` (like the seed's "Handling big models" example), a Llama-7B
shape as safetensors shards.  For each, in one run:

* the disk's read bandwidth, reading the checkpoint once after dropping its pages from the
  page cache (``posix_fadvise(DONTNEED)``): the physical limit of a load is bytes / bandwidth;
* single-process ``from_pretrained`` (the checkpoint's dtype) + ``generate`` of ``--tokens``
  greedy tokens: peak RSS, load seconds, seconds per token;
* each stage of ``pipeserve run``'s plan (4 stages, default flags) loaded alone in its own
  process: peak RSS growth while loading / stage bytes, load seconds;
* ``pipeserve run DIR --stages 4`` (default flags): every process's peak RSS, total / checkpoint
  bytes, time to first token, seconds per token, tokens equal to single-process ``generate``;
* plans: the default ``pipeserve plan`` of each (profile cache cold), and of a Llama-2-70B config.

[Note: weights whose greedy tokens vary]
Random weights at the usual init (std 0.02) make a 30-layer model decode one id over and over,
so a token comparison would mean little.  Matrices here are drawn with std 1/sqrt(fan-in) and
embeddings with std 1 (activations stay O(1) through the layers and the logits differ by
position); the report states whether the tokens varied.

Peaks are ``VmHWM`` of each process (``/proc``), not ``ru_maxrss`` (see ``bench.harness``'s note).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.harness import proc_status, reset_peak_rss
from bench.scale_report import report
from pipeline_core.cost import cpu_name

RESULTS = Path(__file__).parent / "results"
PROMPT = [11, 2045, 318, 257, 1332, 286]
SHAPES: dict[str, dict[str, Any]] = {
    "bloom-7b1": dict(
        model_type="bloom",
        architectures=["BloomForCausalLM"],
        vocab_size=250880,
        hidden_size=4096,
        n_layer=30,
        n_head=32,
        dtype="bfloat16",
    ),
    "llama-7b": dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        dtype="bfloat16",
    ),
    "llama-2-70b": dict(  # planned only
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=32000,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        dtype="bfloat16",
    ),
}
LAYOUT = {"bloom-7b1": ("bin", 7), "llama-7b": ("safetensors", 7)}


def config_of(shape: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    cfg = dict(shape)
    arch = cfg.pop("architectures")
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config.architectures = arch
    return config


def write_checkpoint(config: Any, path: Path, fmt: str, shards: int, seed: int = 0) -> int:
    """Random weights of ``config``'s model in its dtype, as ``shards`` files + index (one
    shard in memory at a time).  Returns the bytes written.  See the module's note."""
    from safetensors.torch import save_file

    from pipeline_core import ModelSource
    from pipeline_core.source import build_skeleton

    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    dtype = getattr(torch, str(config.dtype).removeprefix("torch."))
    model = build_skeleton(ModelSource(checkpoint=str(path)), dtype)
    state = {n: t for n, t in model.state_dict().items() if t.is_meta}  # tied: listed once
    seen: set[int] = set()
    names = []
    for n, p in model.named_parameters():
        if id(p) not in seen and n in state:
            seen.add(id(p))
            names.append(n)
    total = sum(state[n].numel() * state[n].element_size() for n in names)
    per, gen = -(-total // shards), torch.Generator().manual_seed(seed)
    stem = "pytorch_model" if fmt == "bin" else "model"
    groups: list[list[str]] = [[]]
    size = 0
    for n in names:
        nb = state[n].numel() * state[n].element_size()
        if groups[-1] and size + nb > per:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += nb
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"{stem}-{i + 1:05d}-of-{len(groups):05d}.{fmt}"
        part = {}
        for n in group:
            t = state[n]
            v = torch.empty(t.shape, dtype=t.dtype)
            if t.dim() >= 2:
                std = 1.0 if "emb" in n else t.shape[-1] ** -0.5
                for i in range(0, t.shape[0], 4096):  # float32 draws a slice at a time
                    rows = v[i : i + 4096]
                    rows.copy_(torch.randn(rows.shape, generator=gen).mul_(std))
            elif n.endswith("weight"):
                v.fill_(1.0)
            else:
                v.copy_(torch.randn(t.shape, generator=gen).mul_(0.02))
            part[n] = v
        if fmt == "bin":
            torch.save(part, path / fname)
        else:
            save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, fname))
        del part
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (path / index).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    return total


def files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix in (".bin", ".safetensors"))


def read_bandwidth(path: Path) -> dict[str, float]:
    """Read every weight file once after evicting its pages: bytes / seconds."""
    files, total = files_of(path), 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    t0 = time.perf_counter()
    buf = bytearray(64 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    seconds = time.perf_counter() - t0
    return {"bytes": total, "seconds": seconds, "gb_per_s": total / seconds / 1e9}


def evict(path: Path) -> None:
    for f in files_of(path):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def _child(args: list[str], timeout: float = 3600) -> dict[str, Any]:
    """Run ``python -m bench.bench_scale ARGS`` and return the JSON object it prints last."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_scale", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{args} failed ({out.returncode}): {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ child processes


def probe_stage(plan_json: str, stage: int) -> dict[str, Any]:
    """Load one stage of a plan in this process: its RSS growth while loading."""
    from pipeline_core import GenStage, Plan
    from pipeline_core.source import build_skeleton, parse_dtype

    plan = Plan.from_json(Path(plan_json).read_text())
    # imports and the model code's first build are the runtime, not the load: do them first
    build_skeleton(plan.source, parse_dtype(plan.dtype), traceable=False)
    gc.collect()
    reset_peak_rss()
    before = proc_status()["VmRSS"]
    t0 = time.perf_counter()
    st = GenStage(plan, stage)
    seconds = time.perf_counter() - t0
    after = proc_status()
    owned = [p for p in st.model.parameters() if not p.is_meta]
    return {
        "stage": stage,
        "stage_bytes": plan.stages[stage].nbytes,
        "rss_before": before,
        "peak": after["VmHWM"],
        "growth": after["VmHWM"] - before,
        "ratio": (after["VmHWM"] - before) / plan.stages[stage].nbytes,
        "load_s": seconds,
        "bytes_read": st.stats.total_bytes,
        "dtypes": sorted({str(p.dtype) for p in owned}),
    }


def single_process(path: str, tokens: int) -> dict[str, Any]:
    """``from_pretrained`` (dtype as the checkpoint: transformers' default) + greedy tokens."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        t1 = time.perf_counter()
        first = model.generate(ids, do_sample=False, max_new_tokens=1, min_new_tokens=1)
        ttft = time.perf_counter() - t1
        t2 = time.perf_counter()
        out = model.generate(
            ids, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0
        )
        gen_s = time.perf_counter() - t2
    new = out[0, len(PROMPT) :].tolist()
    assert new[0] == first[0, -1].item()
    return {
        "dtype": str(model.dtype),
        "load_s": load_s,
        "ttft_s": ttft,
        "s_per_token": (gen_s - ttft) / max(1, tokens - 1),
        "tokens": new,
        "peak": proc_status()["VmHWM"],
    }


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


class Watcher:
    """Polls every process under ``root`` (2 Hz): each one's peak RSS (``VmHWM``), its command
    line, and the largest sum of their current RSS (what the host held at once)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peaks: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.max_total = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.is_set():
            total = 0
            for pid in _descendants(self.root):
                with contextlib.suppress(OSError, KeyError):  # gone meanwhile
                    st = proc_status(pid)
                    self.peaks[pid] = max(self.peaks.get(pid, 0), st["VmHWM"])
                    total += st["VmRSS"]
                    if pid not in self.names:
                        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                        self.names[pid] = " ".join(a.decode() for a in argv[2:5])
            self.max_total = max(self.max_total, total)
            self._done.wait(0.5)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def run_pipeline(path: Path, stages: int, tokens: int) -> dict[str, Any]:
    """``pipeserve run`` with default flags; every process's peak RSS (polled), the time to
    each streamed token."""
    cmd = [sys.executable, "-m", "pipeserve", "run", str(path), "--stages", str(stages)]
    cmd += ["--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(tokens)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watch = Watcher(proc.pid)
    got: list[int] = []
    times: list[float] = []
    buf = ""
    assert proc.stdout is not None
    while ch := proc.stdout.read(1):
        if ch.isdigit():
            buf += ch
        elif buf:
            got.append(int(buf))
            times.append(time.perf_counter() - t0)
            buf = ""
    err = proc.stderr.read() if proc.stderr else ""
    rc = proc.wait()
    watch.stop()
    peaks = sorted(watch.peaks.values(), reverse=True)
    if rc != 0:
        return {"rc": rc, "error": err[-2000:], "peaks": peaks}
    return {
        "rc": rc,
        "tokens": got,
        "first_token_s": times[0],  # from the command's start: plan, load, prefill
        "s_per_token": (times[-1] - times[0]) / max(1, len(times) - 1),
        "total_s": time.perf_counter() - t0,
        "peaks": peaks,
        "max_total_rss": watch.max_total,
    }


def run_cluster(path: Path, stages: int, tokens: int) -> dict[str, Any]:
    """The gRPC cluster on this host: ``pipeserve local DIR --stages N --once`` (a coordinator
    and N stage workers as processes; its self-check generates ``tokens`` greedy tokens for
    three prompts and compares them with single-process ``transformers``, whose model it loads
    and frees before the workers start).  Peak RSS of every process, the most the host held at
    once, the load seconds, each prompt's time to first token and seconds per token."""
    cmd = [sys.executable, "-m", "pipeserve", "local", str(path), "--stages", str(stages)]
    cmd += ["--port", "0", "--once", "--max-new-tokens", str(tokens)]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watch = Watcher(proc.pid)
    marks: dict[str, float] = {}
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        for key, text in (("workers_up", "workers started"), ("loaded", "loaded over")):
            if text in line and key not in marks:
                marks[key] = time.perf_counter() - t0
    rc = proc.wait()
    watch.stop()
    procs = [
        {"process": watch.names.get(pid, "?"), "peak": peak}
        for pid, peak in sorted(watch.peaks.items(), key=lambda kv: -kv[1])
    ]
    out: dict[str, Any] = {"rc": rc, "procs": procs, "max_total_rss": watch.max_total}
    out["equal"] = any("same tokens as single-process" in ln for ln in lines)
    if rc != 0 or "loaded" not in marks:
        return {**out, "error": "\n".join(lines[-30:])}
    timing = [ln.split("first token ")[1] for ln in lines if "first token " in ln]
    out["first_token_s"] = [float(t.split(" s,")[0]) for t in timing]
    out["s_per_token"] = [float(t.split("then ")[1].split(" s/token")[0]) for t in timing]
    out["tokens"] = [
        ast.literal_eval(ln.split("-> ")[1].split("   ")[0]) for ln in lines if "-> [" in ln
    ]
    out["load_s"] = marks["loaded"] - marks["workers_up"]
    out["total_s"] = time.perf_counter() - t0
    out["loadavg"] = sorted([load_before, os.getloadavg()[0]])  # 1-minute, before and after
    return out


def plan_once(
    path: Path, stages: int, worker_memory: str = "24GiB", trace: bool = False
) -> dict[str, Any]:
    """``pipeserve plan DIR --stages N`` (default policy: balanced, profiled; ``--trace``
    also records stage I/O with torch.export) with a cold profile cache, in its own process:
    seconds, peak RSS, workers of a size needed."""
    env = {**os.environ, "PIPESERVE_PROFILE_CACHE": tempfile.mktemp(suffix=".json")}
    cmd = [sys.executable, "-m", "pipeserve", "plan", str(path), "--stages", str(stages)]
    cmd += ["--worker-memory", worker_memory] + (["--trace"] if trace else [])
    cmd = ["/usr/bin/time", "-f", "%M %e", *cmd]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - t0
    peak_kib, _wall = out.stderr.strip().splitlines()[-1].split()
    need = [ln for ln in out.stdout.splitlines() if ln.startswith("workers of")]
    dtype = [ln for ln in out.stdout.splitlines() if ln.startswith("policy")]
    return {
        "seconds": seconds,
        "peak": int(peak_kib) * 1024,
        "rc": out.returncode,
        "text": out.stdout if out.returncode == 0 else out.stderr[-2000:],
        "workers_needed": need[0] if need else "",
        "dtype": dtype[0].split("dtype")[1].split()[0] if dtype else "",
    }


def _plan_json(path: Path, stages: int, out: Path) -> Any:
    """The plan ``pipeserve run`` makes (balanced by FLOPs, the checkpoint's dtype)."""
    from pipeline_core import ModelSource, Policy, Workload, make_plan

    plan = make_plan(
        ModelSource(checkpoint=str(path)),
        Policy.balanced(stages),
        trace=False,
        workload=Workload(profile=False),
    )
    out.write_text(plan.dumps())
    return plan


def bench_model(name: str, root: Path, stages: int, tokens: int) -> dict[str, Any]:
    fmt, shards = LAYOUT[name]
    path = root / name
    if not (path / "config.json").is_file() or not files_of(path):
        print(f"writing {name} ({fmt}) under {path} ...", flush=True)
        write_checkpoint(config_of(SHAPES[name]), path, fmt, shards)
    ckpt_bytes = sum(f.stat().st_size for f in files_of(path))
    row: dict[str, Any] = {"model": name, "format": fmt, "checkpoint_bytes": ckpt_bytes}
    row["disk"] = read_bandwidth(path)
    print(f"{name}: disk {row['disk']['gb_per_s']:.2f} GB/s", flush=True)
    plan = _plan_json(path, stages, root / f"{name}.plan.json")
    row["dtype"] = plan.dtype
    row["stage_bytes"] = [s.nbytes for s in plan.stages]
    row["stages"] = []
    for k in range(stages):
        evict(path)
        row["stages"].append(_child(["probe", str(root / f"{name}.plan.json"), str(k)]))
        print(f"  stage {k}: {row['stages'][-1]['ratio']:.3f}x", flush=True)
    evict(path)
    row["single"] = _child(["single", str(path), str(tokens)])
    print(f"  single process: {row['single']}", flush=True)
    evict(path)
    row["run"] = run_pipeline(path, stages, tokens)
    row["run"]["equal"] = row["run"].get("tokens") == row["single"]["tokens"]
    print(f"  pipeserve run: {row['run']}", flush=True)
    cluster_row(row, path, stages, tokens)
    plan_rows(row, path, stages, traced=True)
    return row


def cluster_row(row: dict[str, Any], path: Path, stages: int, tokens: int) -> None:
    evict(path)
    row["cluster"] = run_cluster(path, stages, tokens)
    print(f"  pipeserve local: {row['cluster']}", flush=True)


def plan_rows(row: dict[str, Any], path: Path, stages: int, traced: bool) -> None:
    """``row["plan"]``: the default ``pipeserve plan``; ``row["plan_traced"]``: with
    ``--trace`` (measured only when ``traced``; else an earlier run's figure is kept)."""
    row["plan"] = plan_once(path, stages)
    print(f"  plan: {row['plan']['seconds']:.1f} s {row['plan']['peak'] / 2**30:.2f} GiB")
    if traced:
        row["plan_traced"] = plan_once(path, stages, trace=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/pipeserve-scale", help="checkpoints (kept)")
    ap.add_argument("--models", default="bloom-7b1,llama-7b")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--out", default=str(RESULTS / "scale.json"))
    ap.add_argument("--keep", action="store_true", help="keep other models' rows in --out")
    ap.add_argument("--skip-70b", action="store_true", help="keep --out's 70B plan row")
    ap.add_argument(
        "--plans-only",
        action="store_true",
        help="re-measure only the default `pipeserve plan` rows (checkpoints already in --dir); "
        "keep every other figure of --out, the traced plans included",
    )
    ap.add_argument(
        "--cluster-only",
        action="store_true",
        help="measure only the gRPC cluster rows (`pipeserve local --once`); keep the rest",
    )
    args = ap.parse_args()
    root = Path(args.dir)
    out = Path(args.out)
    # a run of some models keeps the other models' rows of an earlier run
    partial = args.keep or args.plans_only or args.cluster_only
    old = json.loads(out.read_text()) if out.is_file() and partial else {}
    rows = {r["model"]: r for r in old.get("models", [])}
    for r in [*rows.values(), old.get("plan_70b") or {}]:  # results of before --trace was opt-in
        untraced = r.pop("plan_untraced", None) or r.pop("untraced", None)
        if untraced is not None:
            if "plan" in r:
                r["plan_traced"], r["plan"] = r["plan"], untraced
            else:  # the 70B row: the traced figures at the top level
                r["traced"] = {k: v for k, v in r.items()}
                r.update(untraced)
    for m in [m for m in args.models.split(",") if m]:
        if args.plans_only:
            print(m, flush=True)
            plan_rows(rows[m], root / m, args.stages, traced=False)
        elif args.cluster_only:
            cluster_row(rows[m], root / m, args.stages, args.tokens)
        else:
            rows[m] = bench_model(m, root, args.stages, args.tokens)
    plan70 = old.get("plan_70b")
    if not (args.skip_70b or args.cluster_only) or plan70 is None:
        cfg70 = root / "llama-2-70b"
        cfg70.mkdir(parents=True, exist_ok=True)
        config_of(SHAPES["llama-2-70b"]).save_pretrained(cfg70)
        traced70 = (plan70 or {}).get("traced")
        plan70 = plan_once(cfg70, args.stages)
        plan70["traced"] = traced70 if args.plans_only else plan_once(cfg70, args.stages, True)
        print(f"70B plan: {plan70['seconds']:.1f} s {plan70['peak'] / 2**30:.2f} GiB")
    result = {
        "host": {"cpus": os.cpu_count(), "cpu": cpu_name(), "date": time.strftime("%F %T")},
        "tokens": args.tokens,
        "models": [rows[m] for m in SHAPES if m in rows],
        "plan_70b": plan70,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    Path(args.out).with_suffix(".md").write_text(report(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "probe":
        print(json.dumps(probe_stage(sys.argv[2], int(sys.argv[3]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "single":
        print(json.dumps(single_process(sys.argv[2], int(sys.argv[3]))))
    else:
        main()
