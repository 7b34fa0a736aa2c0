"""``bench_core``'s report: the markdown table of ``core.json`` (metric, goal, measured,
baseline, ratio, pass/fail) and the machine.  ``python -m bench.bench_core --report-only``
rewrites it.
"""

from __future__ import annotations

from typing import Any

from bench.baselines import (
    BATCH,
    CHUNKS,
    ITERS,
    MID_LLAMA,
    ROUNDS,
    SEQ,
    SHARD_SIZE,
    TRACE_TIMEOUT_S,
    WARMUP,
)
from bench.harness import GiB, MiB


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


GOAL_PLAN_S = 10.0
GOAL_PLAN_RSS = 1 * GiB
GOAL_LOAD_RATIO = 1.25
GOAL_THROUGHPUT_RATIO = 1.0
GOAL_MAX_DIFF = 1e-4


# ---------------------------------------------------------------------------------------------
# memory helpers (Linux)


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
