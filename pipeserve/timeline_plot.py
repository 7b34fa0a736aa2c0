"""Render a pipeline timeline (``pipeserve admin timeline``) as a Gantt chart PNG: one row per
stage, time on x, compute bars coloured by micro-batch, sends hatched; gaps are bubbles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["render_timeline", "summarize"]


def summarize(events: list[Any]) -> dict[int, dict[str, float]]:
    """Per stage: seconds of compute, send and wait, and the window it spans."""
    out: dict[int, dict[str, float]] = {}
    for e in events:
        s = out.setdefault(e.stage, {"compute": 0.0, "send": 0.0, "wait": 0.0})
        s[e.kind] = s.get(e.kind, 0.0) + (e.end - e.start)
    return out


def render_timeline(events: list[Any], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not events:
        raise ValueError("no timeline events: run some requests first")
    t0 = min(e.start for e in events if e.kind != "wait")
    stages = sorted({e.stage for e in events})
    groups = sorted({e.group for e in events})
    cmap = plt.get_cmap("tab10")
    colour = {g: cmap(i % 10) for i, g in enumerate(groups)}
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.7 * len(stages)))
    for e in events:
        y = stages.index(e.stage)
        if e.kind == "compute":
            ax.broken_barh(
                [(e.start - t0, e.end - e.start)],
                (y - 0.35, 0.7),
                facecolors=colour[e.group],
                edgecolor="black",
                linewidth=0.2,
            )
        elif e.kind == "send":
            ax.broken_barh([(e.start - t0, e.end - e.start)], (y + 0.2, 0.15), facecolors="grey")
    ax.set_yticks(range(len(stages)), [f"stage {s}" for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    busy = summarize(events)
    span = max(e.end for e in events) - t0 or 1.0
    util = ", ".join(f"stage {s}: {busy[s]['compute'] / span:.0%} busy" for s in stages)
    ax.set_title(title or f"pipeline timeline ({len(groups)} micro-batches; {util})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
