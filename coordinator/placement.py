"""Placement and planning: which workers a model's stages go to, and the plan made for them.

``balanced`` (by time) plans over the idle workers, fastest first, with their memory and
relative speeds and unit times profiled on one of them; other policies take the first idle
workers.  A lost stage goes to the first spare whose memory holds it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline_core import ModelSource, Plan, Policy, Workload, make_plan
from pipeline_core.source import dtype_name, resolve_dtype

from .errors import InvalidRequest, PermissionDenied, WorkerCallFailed, clip
from .records import WorkerRecord

__all__ = [
    "MAX_PATH",
    "Placement",
    "check_checkpoint",
    "confined",
    "default_mode",
    "place",
    "plan_model",
    "relative_speeds",
    "spare_for",
    "stage_workers",
]

log = logging.getLogger(__name__)

UNKNOWN_MEMORY = 2**62
"""A worker that reported no memory size is planned as if it had no limit."""
MAX_PATH = 4096
SAME_SPEED = 0.15
"""Workers whose speed figures differ by less than this share count as equally fast: the
start-up matmul is noisy, and a 5% wobble must not move layers between identical workers."""
PROFILE_TIMEOUT_S = 300.0
"""How long a worker may take to profile a model's unit kinds before planning by FLOPs."""


def relative_speeds(speeds: list[float]) -> list[float]:
    """Each worker's speed relative to the first, snapped to 1.0 within ``SAME_SPEED``."""
    ref = speeds[0] if speeds and speeds[0] > 0 else 0.0
    if ref <= 0 or any(s <= 0 for s in speeds):
        return [1.0] * len(speeds)
    out = []
    for s in speeds:
        r = s / ref
        out.append(1.0 if abs(r - 1.0) < SAME_SPEED else r)
    return out


@dataclass
class Placement:
    """A balanced plan's inputs from the idle workers: who, how fast, how big, unit times
    (the KV budget to reserve goes into the caller's workload)."""

    workers: list[WorkerRecord]
    policy: Policy
    unit_seconds: dict[str, float] | None
    times_from: str


def confined(path: str, roots: list[Path]) -> bool:
    """Whether ``path`` resolves (symlinks and ``..`` followed) inside one of ``roots``
    (no roots: anything goes)."""
    if not roots:
        return True
    real = Path(path).resolve()
    return any(real == r.resolve() or real.is_relative_to(r.resolve()) for r in roots)


def check_checkpoint(checkpoint: str, roots: list[Path]) -> None:
    """Raise unless ``checkpoint`` is a directory inside the model roots."""
    if "\x00" in checkpoint or len(checkpoint) > MAX_PATH:
        raise InvalidRequest(
            f"checkpoint path {clip(checkpoint)} holds a NUL byte or is longer than "
            f"{MAX_PATH} characters"
        )
    if not confined(checkpoint, roots):
        raise PermissionDenied(
            f"checkpoint {clip(checkpoint)} is outside the model roots "
            f"{[str(r) for r in roots]} (coordinator --model-root)"
        )
    if not checkpoint or not Path(checkpoint).is_dir():
        raise InvalidRequest(
            f"checkpoint directory {clip(checkpoint)} does not exist on the coordinator"
        )


def default_mode(checkpoint: str, roots: list[Path]) -> str:
    """``generate`` for Hugging Face models that can generate, else ``forward`` (also for a
    path outside the model roots: nothing outside them is read; planning refuses it)."""
    if "\x00" in checkpoint or len(checkpoint) > MAX_PATH or not confined(checkpoint, roots):
        return "forward"
    try:
        from pipeline_core.source import _hf_model_class, hf_config

        cls = _hf_model_class(hf_config(checkpoint))
        return "generate" if getattr(cls, "can_generate", lambda: False)() else "forward"
    except Exception:  # not an HF checkpoint (or unreadable): the planner reports it
        return "forward"


def place(
    idle: list[WorkerRecord], checkpoint: str, policy: Policy, dtype: str, wl: Workload, mode: str
) -> Placement | None:
    """For ``balanced``: the idle workers to plan over (fastest first), their memory and
    relative speeds, the KV budget to reserve, and unit times profiled on one of them."""
    top = max((w.speed for w in idle), default=0.0)

    def rank(w: WorkerRecord) -> tuple[int, float, int]:  # fastest first, then by age
        fast = w.speed >= top * (1 - SAME_SPEED)
        return (0, 0.0, w.seq) if fast else (1, -w.speed, w.seq)

    idle = sorted(idle, key=rank)
    n = policy.stages or len(idle)
    if n < 1 or len(idle) < n:
        return None  # not enough workers yet: plan without them (loading refuses)
    chosen = idle[:n]
    if not wl.kv_tokens and mode == "generate":
        wl.kv_tokens = min(w.kv_tokens for w in chosen)
    ref = chosen[0]
    times: dict[str, float] | None = None
    times_from = "flops"
    try:
        p = ref.client.profile(checkpoint, dtype, wl.batch, wl.seq, wl.chunks, PROFILE_TIMEOUT_S)
        times, times_from = p.unit_seconds, f"worker {ref.id} ({p.device_name})"
    except WorkerCallFailed as e:
        log.warning("profiling on %s failed (%s): planning by FLOPs", ref.id, e)
    return Placement(
        workers=chosen,
        policy=Policy.balanced(
            n,
            memory=[w.memory if w.memory > 0 else UNKNOWN_MEMORY for w in chosen],
            speeds=relative_speeds([w.speed for w in chosen]),
        ),
        unit_seconds=times,
        times_from=times_from,
    )


def plan_model(
    checkpoint: str,
    policy: Policy,
    dtype: str,
    wl: Workload,
    *,
    roots: list[Path],
    idle: list[WorkerRecord],
    trace: bool = False,
    mode: str = "generate",
) -> tuple[Plan, Placement | None]:
    """The plan for ``checkpoint`` (in its own dtype unless ``dtype``), placed on ``idle``
    workers for ``balanced``.  Raises the core's errors and the planner's."""
    check_checkpoint(checkpoint, roots)
    # one dtype for the plan and the worker that profiles: the checkpoint's by default
    dtype = dtype_name(resolve_dtype(ModelSource(checkpoint=checkpoint), dtype or None))
    wl.check()
    placed = None
    if policy.kind == "balanced":
        placed = place(idle, checkpoint, policy, dtype, wl, mode)
        if placed is not None:
            policy = placed.policy
        else:
            policy.stages = policy.stages or 1
            wl.profile = False
    plan = make_plan(
        ModelSource(checkpoint=checkpoint),
        policy,
        dtype=dtype,
        trace=trace,
        workload=wl,
        unit_seconds=placed.unit_seconds if placed else None,
    )
    return plan, placed


def stage_workers(plan: Plan, placed: Placement | None) -> list[WorkerRecord]:
    """The worker a balanced plan gives each stage (empty without a placement)."""
    if placed is None:
        return []
    return [placed.workers[s.worker if s.worker >= 0 else s.index] for s in plan.stages]


def spare_for(plan: Plan, stage: int, spares: list[WorkerRecord]) -> WorkerRecord:
    """The first spare (by registration) whose memory holds the stage's weights and KV budget;
    else the one with the most memory."""
    st = plan.stages[stage]
    need = st.nbytes + st.kv_bytes_per_token * int(plan.workload.get("kv_tokens", 0))
    fits = [w for w in spares if w.memory <= 0 or w.memory >= need]
    return fits[0] if fits else max(spares, key=lambda w: w.memory)
