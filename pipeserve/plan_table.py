"""A plan as a table for people: per stage its worker (when placed), bytes, KV bytes per token,
estimated time and share of the compute, and the predicted throughput and bubble.

The one formatter for every place that shows a plan (``pipeserve plan``, ``pipeserve admin
plan``); ``stage_shares`` is the compute share the coordinator also reports per stage.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline_core.plan import Plan

__all__ = ["format_plan", "human", "stage_shares"]


def human(n: float) -> str:
    """``n`` bytes in B / KiB / MiB / GiB / TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def stage_shares(plan: Plan) -> list[float]:
    """Each stage's share of the compute: of the estimated time when the plan has a workload
    estimate, else of the FLOPs."""
    timed = bool(plan.estimate)
    work = [s.seconds if timed else s.flops for s in plan.stages]
    total = sum(work) or 1
    return [w / total for w in work]


def _units(units: Sequence[str]) -> str:
    shown = list(units) if len(units) <= 4 else [*units[:2], "...", units[-1]]
    return f"{', '.join(shown)} ({len(units)})"


def format_plan(plan: Plan, *, workers: Sequence[str] = (), times_from: str = "") -> str:
    """The plan as text.  ``workers``: the worker id of each stage (a column when given);
    ``times_from``: where the unit times came from (default: the units' own cost sources)."""
    lines = [
        f"model   {plan.source.factory or plan.source.checkpoint}",
        f"policy  {plan.policy.describe()}   dtype {plan.dtype}   "
        f"total {human(plan.total_bytes)} in {len(plan.units)} units",
    ]
    for t in plan.loaded_twice:
        lines.append(
            f"tied    {' = '.join([t['tensor'], *t['aliases']])} is loaded by stages "
            f"{', '.join(map(str, t['stages']))}: {human(t['extra_bytes'])} more memory"
        )
    timed = bool(plan.estimate)
    if timed:
        w = plan.workload
        source = times_from or " / ".join(sorted({u.get("cost", "") for u in plan.units} - {""}))
        lines.append(
            f"times   per microbatch of {-(-w['batch'] // w['chunks'])} x {w['seq']} on "
            f"{w['device']} ({w['threads']} thread(s)); times from {source}"
        )
    worker_col = f"{'worker':>10}  " if workers else ""
    lines += [
        "",
        f"{'stage':>5}  {worker_col}{'bytes':>12}  {'KV/token':>9}  {'est. ms':>8}  "
        f"{'compute':>7}  {'tensors':>7}  {'recv':>4}  {'send':>4}  units",
    ]
    traced = any(s.receives or s.sends for s in plan.stages)  # stage I/O recorded
    for s, share in zip(plan.stages, stage_shares(plan), strict=True):
        ms = f"{1e3 * s.seconds:8.1f}" if timed else f"{'-':>8}"
        recv, send = (len(s.receives), len(s.sends)) if traced else ("-", "-")
        worker = f"{workers[s.index] or '-':>10}  " if workers else ""
        lines.append(
            f"{s.index:>5}  {worker}{human(s.nbytes):>12}  {human(s.kv_bytes_per_token):>9}  "
            f"{ms}  {100 * share:>6.1f}%  {len(s.tensors):>7}  {recv:>4}  "
            f"{send:>4}  {_units(s.units)}"
        )
    if timed:
        e, w = plan.estimate, plan.workload
        lines += [
            "",
            f"predicted: one batch of {w['batch']} in {w['chunks']} microbatches "
            f"{e['batch_seconds']:.3f} s ({e['samples_per_s']:.2f} samples/s), bubble "
            f"{100 * e['bubble']:.0f}%; batches streamed back to back "
            f"{e['streaming_samples_per_s']:.2f} samples/s",
        ]
    return "\n".join(lines)
