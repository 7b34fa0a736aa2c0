"""Where a generation stage's time goes, step by step (off unless asked for).

Every stage process keeps one :class:`StepTimes`.  With ``GenStage(..., step_timing=True)``
(``LocalGenerator(step_timing=True)`` passes it to the stages it spawns; the CLI and the stage
worker take it from ``PIPESERVE_STEP_TIMING=1``), or ``stage.timing.on = True``, each stage adds
up:

* ``compute``: inside the units the stage owns (the model's own modules: decoder layers,
  embeddings, norm, head), timed from their forward pre-hook to their forward hook;
* ``stage_py``: the rest of a step -- the model's Python outside the units (masks, rotary
  tables, ``prepare_inputs_for_generation``), the hooks, passthroughs of units the stage does
  not own, cache bookkeeping (phantom layers), payload packing;
* ``ahead``: the part of ``stage_py`` a later stage ran before the step's message came
  (``GenStage.decode_ahead``): spent while the earlier stages computed, off the token's path;
* ``sample``: logits rules and sampling (last stage);
* ``send``: handing the step's message to the next stage (gloo send until flushed);
* ``wait``: blocked waiting for the next message;
* ``sched``: stage 0's scheduler, outside its own steps and sends (retiring rows, admitting,
  building the next step's message).

Beside them, ``compute_cpu``: the thread's CPU time inside the units (``compute`` less the time
the stage was preempted or its vCPU taken) -- so slow compute reads as slow execution or as
waiting for a core.

Every second of a stage's wall time falls in exactly one of the categories, so a stage's row
sums to its time per step.  Off, the only cost is one attribute test per hook call and per step.
``GenerationEngine.stats`` carries the totals of every stage (microseconds, in
:data:`TIMING_FIELDS`), and :func:`breakdown` turns two snapshots into per-step figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

__all__ = ["CATEGORIES", "TIMING_FIELDS", "StepTimes", "breakdown"]

CATEGORIES = ("compute", "stage_py", "ahead", "sample", "send", "wait", "sched")
TIMING_FIELDS = (
    "t_steps",
    "t_compute_us",
    "t_step_us",
    "t_sample_us",
    "t_send_us",
    "t_wait_us",
    "t_loop_us",
    "t_ahead_us",
    "t_compute_cpu_us",
)
"""Integer totals a stage reports with its cache figures (``cache_stats``)."""


@dataclass(slots=True)
class StepTimes:
    """Totals in seconds since the stage was built (see module docstring)."""

    on: bool = False
    steps: int = 0
    compute_s: float = 0.0
    step_s: float = 0.0
    """The whole of ``run_step``: compute + stage Python + sampling."""
    sample_s: float = 0.0
    send_s: float = 0.0
    wait_s: float = 0.0
    loop_s: float = 0.0
    """Stage 0: the scheduler loop while not waiting (its steps and sends included)."""
    ahead_s: float = 0.0
    """Of ``step_s``: run before the step's message came (``GenStage.decode_ahead``)."""
    compute_cpu_s: float = 0.0
    """Of ``compute_s``: this thread's CPU time (the rest: preempted, or the vCPU stolen)."""
    _unit_t0: float = 0.0
    _unit_c0: float = 0.0

    def unit_start(self) -> None:
        self._unit_t0 = time.perf_counter()
        self._unit_c0 = time.thread_time()

    def unit_end(self) -> None:
        if self._unit_t0:  # the CPU clock read inside the wall clock's interval at both ends
            self.compute_cpu_s += time.thread_time() - self._unit_c0
            self.compute_s += time.perf_counter() - self._unit_t0
            self._unit_t0 = 0.0

    def waited(self, since: float) -> float:
        """Stage 0's scheduler: add the inbox wait that began at ``since``; returns now."""
        now = time.perf_counter()
        if self.on:
            self.wait_s += now - since
        return now

    def looped(self, since: float) -> None:
        """Stage 0's scheduler: add the rest of a loop iteration that began at ``since``."""
        if self.on:
            self.loop_s += time.perf_counter() - since

    def sent(self, seconds: float) -> None:
        if self.on:
            self.send_s += seconds

    def totals(self) -> dict[str, int]:
        """The :data:`TIMING_FIELDS` (microseconds; ``t_steps`` a count)."""
        us = [
            self.compute_s,
            self.step_s,
            self.sample_s,
            self.send_s,
            self.wait_s,
            self.loop_s,
            self.ahead_s,
            self.compute_cpu_s,
        ]
        return dict(zip(TIMING_FIELDS, [self.steps, *(int(x * 1e6) for x in us)], strict=True))


def breakdown(before: dict[str, Any], after: dict[str, Any], steps: int | None = None) -> dict:
    """Milliseconds per step of each category between two ``stats()`` entries of one stage.

    ``steps``: divide by this instead of the stage's own step count (stage 0 of a one-stage
    pipeline counts its steps, the scheduler's share included)."""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in TIMING_FIELDS}
    n = steps if steps is not None else d["t_steps"]
    if n <= 0:
        return {c: 0.0 for c in CATEGORIES} | {"steps": 0, "total": 0.0}
    ms = {k: v / 1e3 / n for k, v in d.items() if k != "t_steps"}
    loop = ms["t_loop_us"]
    out = {
        "compute": ms["t_compute_us"],
        "stage_py": ms["t_step_us"] - ms["t_compute_us"] - ms["t_sample_us"] - ms["t_ahead_us"],
        "ahead": ms["t_ahead_us"],
        "sample": ms["t_sample_us"],
        "send": ms["t_send_us"],
        "wait": ms["t_wait_us"],
        "sched": max(0.0, loop - ms["t_step_us"] - ms["t_send_us"]) if loop else 0.0,
    }
    out["total"] = sum(out[c] for c in CATEGORIES)
    out["compute_cpu"] = ms["t_compute_cpu_us"]
    out["steps"] = n
    return out
