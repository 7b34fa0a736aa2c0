"""The ``Plan``: which units, tensors and bytes each stage owns, and what it receives/sends.

A plan is made on the coordinator from the model skeleton (meta parameters: no weight memory)
and is plain, versioned JSON, so a worker on another host rebuilds exactly its stage from it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import split as policies
from .cost import UnitCost, Workload, estimate_units
from .errors import DoesNotFit, PlanError
from .profile_cache import ProfileCache
from .source import (
    InputSpec,
    ModelSource,
    bound_sequences,
    build_skeleton,
    default_inputs,
    resolve_dtype,
)
from .trace import WHOLE, TracedPipeline, Wire, call_order, model_name_of, trace_pipeline
from .units import TensorInfo, Unit, find_units, stage_nbytes, tensor_table

__all__ = [
    "PLAN_VERSION",
    "Plan",
    "Policy",
    "StagePlan",
    "make_plan",
    "predict",
    "unit_seconds",
    "workers_needed",
]

PLAN_VERSION = 1


@dataclass(kw_only=True)
class Policy:
    """How to split: ``equal_size`` (``stages``), ``threshold`` (``max_bytes``), ``manual``
    (``split_at`` module names) or ``markers`` (``pipe_split()`` calls in the model)."""

    kind: str
    stages: int = 0
    max_bytes: int = 0
    split_at: list[str] = field(default_factory=list)
    memory: list[int] = field(default_factory=list)
    """``balanced``: bytes each stage's worker can hold (empty: unlimited)."""
    speeds: list[float] = field(default_factory=list)
    """``balanced``: relative speed of each stage's worker (empty: all equal)."""

    @classmethod
    def equal_size(cls, n: int) -> Policy:
        return cls(kind="equal_size", stages=n)

    @classmethod
    def threshold(cls, max_bytes: int | str) -> Policy:
        return cls(kind="threshold", max_bytes=policies.parse_size(max_bytes))

    @classmethod
    def manual(cls, split_at: list[str]) -> Policy:
        return cls(kind="manual", split_at=list(split_at))

    @classmethod
    def balanced(
        cls, n: int, memory: list[int | str] | None = None, speeds: list[float] | None = None
    ) -> Policy:
        return cls(
            kind="balanced",
            stages=n,
            memory=[policies.parse_size(m) for m in memory or []],
            speeds=[float(s) for s in speeds or []],
        )

    @classmethod
    def markers(cls) -> Policy:
        return cls(kind="markers")

    def describe(self) -> str:
        if self.kind == "equal_size":
            return f"equal_size({self.stages})"
        if self.kind == "threshold":
            return f"threshold({self.max_bytes} bytes)"
        if self.kind == "manual":
            return f"manual({', '.join(self.split_at)})"
        if self.kind == "balanced":
            return f"balanced({self.stages}) by time" + (
                " within worker memory" * bool(self.memory)
            )
        return "pipe_split() markers"


@dataclass(kw_only=True)
class StagePlan:
    index: int
    units: list[str]
    """Units of this stage in order; ``units[0]`` is where the stage begins."""
    tensors: list[str]
    """Checkpoint tensors this stage loads (parameters and persistent buffers)."""
    nbytes: int
    """Parameter + buffer bytes (tied tensors once)."""
    flops: int = 0
    """FLOPs of the stage's units on the example inputs (relative compute cost)."""
    seconds: float = 0.0
    """Estimated compute per microbatch of the plan's workload on this stage's worker."""
    kv_bytes_per_token: int = 0
    """KV-cache bytes this stage holds per cached token (generation)."""
    worker: int = -1
    """``balanced`` with per-worker memory/speeds: which of those workers takes this stage."""
    receives: list[dict[str, Any]] = field(default_factory=list)
    sends: list[dict[str, Any]] = field(default_factory=list)


@dataclass(kw_only=True)
class Plan:
    version: int = PLAN_VERSION
    source: ModelSource
    dtype: str
    inputs: list[InputSpec]
    policy: Policy
    units: list[dict[str, Any]]
    stages: list[StagePlan]
    tied: dict[str, list[str]]
    """Tensor name -> the other names of the same (tied) tensor."""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    workload: dict[str, Any] = field(default_factory=dict)
    """The :class:`~pipeline_core.cost.Workload` times were estimated for (empty: none)."""
    estimate: dict[str, Any] = field(default_factory=dict)
    """Predicted pipeline throughput and bubble for the workload (see :func:`predict`)."""
    rows_mixed: str = ""
    """Non-empty (the reason) when the batch must not be cut into microbatches."""
    output_tree: str = ""
    """The model's output structure (a dumped pytree spec; empty: a value or a tuple)."""
    loaded_twice: list[dict[str, Any]] = field(default_factory=list)
    """Tied tensors loaded by more than one stage: ``tensor``, ``aliases``, ``stages``,
    ``extra_bytes`` (the copies beyond the first)."""

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def split_points(self) -> list[str]:
        return [s.units[0] for s in self.stages[1:]]

    @property
    def total_bytes(self) -> int:
        return sum(u["nbytes"] for u in self.units)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["source"] = self.source.to_json()
        d["inputs"] = [i.to_json() for i in self.inputs]
        return d

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    @classmethod
    def from_json(cls, d: dict[str, Any] | str) -> Plan:
        if isinstance(d, str):
            d = json.loads(d)
        if d.get("version") != PLAN_VERSION:
            raise PlanError(
                f"plan version {d.get('version')} is not supported (this build reads "
                f"version {PLAN_VERSION}); re-plan with this version of pipeserve"
            )
        d = dict(d)
        d["source"] = ModelSource.from_json(d["source"])
        d["inputs"] = [InputSpec.from_json(i) for i in d["inputs"]]
        d["policy"] = Policy(**d["policy"])
        d["stages"] = [StagePlan(**s) for s in d["stages"]]
        return cls(**d)


def _starts(
    policy: Policy, units: list[Unit], costs: list[UnitCost], kv_tokens: int
) -> tuple[list[int], list[int]]:
    """Stage starts, and for ``balanced`` which given worker takes each stage."""
    sizes = [u.nbytes for u in units]
    names = [u.name for u in units]
    if policy.kind == "equal_size":
        return policies.equal_size(sizes, policy.stages, names), []
    if policy.kind == "threshold":
        return policies.threshold(sizes, policy.max_bytes, names), []
    if policy.kind == "manual":
        return policies.manual(names, policy.split_at), []
    if policy.kind == "balanced":
        kv = [c.kv_bytes_per_token * kv_tokens for c in costs]
        try:
            order, starts = policies.balanced_order(
                [c.seconds for c in costs],
                [b + k for b, k in zip(sizes, kv, strict=True)],
                policy.stages,
                names,
                memory=policy.memory or None,
                speeds=policy.speeds or None,
            )
        except DoesNotFit as e:
            if kv_tokens:
                raise DoesNotFit(
                    f"{e} (weights {policies._human(sum(sizes))} + KV cache "
                    f"{policies._human(sum(kv))} for {kv_tokens} tokens)"
                ) from e
            raise
        return starts, order if policy.memory or policy.speeds else []
    raise PlanError(f"unknown split policy {policy.kind!r}")


def predict(seconds: list[float], workload: Workload) -> dict[str, Any]:
    """Throughput and bubble of a fill-drain pass from per-stage seconds per microbatch.

    One batch of ``chunks`` microbatches takes ``sum(t) + (chunks - 1) * max(t)`` (the first
    microbatch crosses every stage, then the slowest stage sets the pace); the bubble is the
    share of stage-time idle in that pass.  Streaming batches back to back (``imap``), the
    slowest stage alone sets the pace: ``microbatch rows / max(t)``.
    """
    m, slow, total = workload.chunks, max(seconds), sum(seconds)
    makespan = total + (m - 1) * slow
    return {
        "stage_seconds": seconds,
        "batch_seconds": makespan,
        "samples_per_s": workload.batch / makespan if makespan else 0.0,
        "streaming_samples_per_s": workload.microbatch / slow if slow else 0.0,
        "bubble": max(0.0, 1 - m * total / (len(seconds) * makespan)) if makespan else 0.0,
    }


def _merge_repeated(
    units: list[Unit], calls: dict[str, int], tensors: dict[str, torch.Tensor]
) -> list[Unit]:
    """Fold units whose module runs more than once into the unit before them."""
    out: list[Unit] = []
    for u in units:
        if calls.get(u.name, 0) > 1 and out:
            prev = out[-1]
            prev.modules += u.modules
            prev.tensors = list(dict.fromkeys(prev.tensors + u.tensors))
            prev.nbytes = stage_nbytes(tensors, prev.tensors)
            prev.flops += u.flops
        else:
            out.append(u)
    return out


def _starts_from_markers(traced: TracedPipeline, units: list[Unit]) -> list[int]:
    owner: list[int] = []
    param_stage = {}
    for i, gm in enumerate(traced.modules):
        for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
            param_stage.setdefault(name.removeprefix(traced.prefix), i)
    for u in units:
        stages = {param_stage[t] for t in u.tensors if t in param_stage}
        if len(stages) > 1:
            raise PlanError(f"a pipe_split() marker falls inside unit {u.name!r}")
        owner.append(stages.pop() if stages else (owner[-1] if owner else 0))
    return [i for i, s in enumerate(owner) if i == 0 or s != owner[i - 1]]


def make_plan(
    source: ModelSource,
    policy: Policy,
    *,
    inputs: list[InputSpec] | None = None,
    dtype: str | torch.dtype | None = None,
    trace: bool = True,
    workload: Workload | None = None,
    unit_seconds: dict[str, float] | None = None,
    profile_cache: str | Path | None = None,
) -> Plan:
    """Plan ``source`` under ``policy`` on the meta device (no weight memory).

    With ``trace`` the model is also captured with ``torch.export`` (fake tensors) to record
    exactly what each stage receives and sends; ``markers`` always traces.  With a
    ``workload`` (always for ``balanced``) every unit's time and KV bytes are estimated
    (:mod:`.cost`) and the plan predicts per-stage time, throughput and bubble;
    ``unit_seconds`` (unit name -> seconds per microbatch, e.g. profiled by a worker on its own
    device) replaces the local estimate.  ``dtype`` None (or ``"auto"``): the checkpoint's
    (:func:`~pipeline_core.source.resolve_dtype`).  ``profile_cache``: the file measured unit
    times are kept in (None: ``~/.cache/pipeserve/unit-profiles.json``; the CLI and servers
    pass ``$PIPESERVE_PROFILE_CACHE``).
    """
    torch_dtype = resolve_dtype(source, dtype)
    model = build_skeleton(source, torch_dtype)
    units = find_units(model)
    if not units:
        raise PlanError(f"model {type(model).__name__} has no submodules to split")
    infos, groups = tensor_table(model)
    if inputs is None:
        inputs = default_inputs(source, model)
    if source.is_hf:
        inputs = bound_sequences(model.config, inputs)
    model_tensors = dict(model.named_parameters(remove_duplicate=False))
    model_tensors.update(model.named_buffers(remove_duplicate=False))
    by_name = {u.name: u for u in units}
    order, calls, flops = call_order(model, inputs, [u.name for u in units], is_hf=source.is_hf)
    for u in units:
        u.flops = flops[u.name]
    units = _merge_repeated([by_name[n] for n in order], calls, model_tensors)
    if workload is None and (policy.kind == "balanced" or unit_seconds):
        workload = Workload()
    costs: list[UnitCost] = []
    if workload is not None:
        if unit_seconds:
            workload = replace(workload, profile=False)
        cache = ProfileCache(profile_cache)
        costs = estimate_units(source, units, inputs, workload, torch_dtype, cache)
        for c in costs:
            if unit_seconds and c.name in unit_seconds:
                c.seconds, c.source = float(unit_seconds[c.name]), "worker"
    traced = None
    order: list[int] = []
    if policy.kind == "markers":
        traced = trace_pipeline(
            build_skeleton(source, torch_dtype), inputs, None, is_hf=source.is_hf
        )
        starts = _starts_from_markers(traced, units)
    else:
        starts, order = _starts(policy, units, costs, workload.kv_tokens if workload else 0)
    ends = [*starts[1:], len(units)]
    stages = []
    for i, (a, b) in enumerate(zip(starts, ends, strict=True)):
        names = [t for u in units[a:b] for t in u.tensors]
        stages.append(
            StagePlan(
                index=i,
                units=[u.name for u in units[a:b]],
                tensors=[t for t in dict.fromkeys(names) if infos[t].persistent],
                nbytes=stage_nbytes(model_tensors, names),
                flops=sum(u.flops for u in units[a:b]),
                seconds=sum(c.seconds for c in costs[a:b]) / _speed(policy, order, i),
                kv_bytes_per_token=sum(c.kv_bytes_per_token for c in costs[a:b]),
                worker=order[i] if order else -1,
            )
        )
    unit_rows = [{"name": u.name, "nbytes": u.nbytes, "flops": u.flops} for u in units]
    for row, c in zip(unit_rows, costs, strict=False):
        row.update(
            seconds=c.seconds,
            flops_workload=c.flops,
            kv_bytes_per_token=c.kv_bytes_per_token,
            cost=c.source,
        )
    plan = Plan(
        source=source,
        dtype=str(torch_dtype).removeprefix("torch."),
        inputs=inputs,
        policy=policy,
        units=unit_rows,
        stages=stages,
        tied={n: [a for a in g if a != n] for n, g in groups.items() if len(g) > 1},
    )
    if workload is not None:
        plan.workload = workload.to_json()
        plan.estimate = predict([s.seconds for s in stages], workload)
    if traced is None and trace and len(stages) > 1:
        traced = trace_pipeline(
            build_skeleton(source, torch_dtype), inputs, plan.split_points, is_hf=source.is_hf
        )
    if traced is not None:
        attach_wiring(plan, traced)
        _owners_from_graphs(plan, traced, model_tensors, infos)
    plan.loaded_twice = _loaded_twice(plan, model_tensors)
    return plan


def workers_needed(plan: Plan, memory: int | str, kv_tokens: int = 0) -> int:
    """The fewest workers of ``memory`` bytes each that can hold the plan's units in order
    (weights, plus KV cache for ``kv_tokens`` tokens where the plan measured it); 0 when one
    unit alone is larger than ``memory``."""
    cap = policies.parse_size(memory)
    sizes = [int(u["nbytes"]) + int(u.get("kv_bytes_per_token", 0)) * kv_tokens for u in plan.units]
    starts = policies._greedy_starts(sizes, cap)
    return 0 if starts is None else len(starts)


def _loaded_twice(plan: Plan, tensors: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Tied tensors that more than one stage loads (an embedding tied to a head at the other
    end of the model): each such stage holds its own copy."""
    out = []
    for name, aliases in plan.tied.items():
        if any(a < name for a in aliases):
            continue  # one row per tied group, under its first name
        group = {name, *aliases}
        stages = [s.index for s in plan.stages if group.intersection(s.tensors)]
        if len(stages) > 1:
            t = tensors[name]
            out.append(
                {
                    "tensor": name,
                    "aliases": sorted(aliases),
                    "stages": stages,
                    "extra_bytes": (len(stages) - 1) * t.numel() * t.element_size(),
                }
            )
    return out


def _owners_from_graphs(
    plan: Plan,
    traced: TracedPipeline,
    model_tensors: dict[str, torch.Tensor],
    infos: dict[str, TensorInfo],
) -> None:
    """Tensors registered outside every unit (CLIP's ``logit_scale`` on the root module) join
    the unit after them in registration order, which need not be the stage that reads them:
    give each stage every checkpoint tensor its traced graph uses."""
    for st, gm in zip(plan.stages, traced.modules, strict=True):
        owned = set(st.tensors)
        named = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers()]
        for name, _ in named:
            n = model_name_of(name).removeprefix(traced.prefix)
            if n not in infos or not infos[n].persistent or n in owned:
                continue
            if not owned.intersection(plan.tied.get(n, [])):
                st.tensors.append(n)
                owned.add(n)
        st.nbytes = stage_nbytes(model_tensors, st.tensors)


def _speed(policy: Policy, order: list[int], stage: int) -> float:
    if not policy.speeds:
        return 1.0
    return policy.speeds[order[stage] if order else stage]


def _describe(w: Wire, traced: TracedPipeline) -> dict[str, Any]:
    if w.src == "input":
        return {"from": "input", "name": w.name}
    if w.src == "const":
        return {"from": "const", "value": w.value}
    d: dict[str, Any] = {"from": f"stage{w.stage}", "index": w.index}
    meta = traced.meta[w.stage]
    if w.index != WHOLE and w.index < len(meta):
        d["dtype"], d["shape"] = meta[w.index]
    return d


def attach_wiring(plan: Plan, traced: TracedPipeline) -> None:
    """Record per stage what it receives and sends (from the traced split)."""
    if traced.num_stages != plan.num_stages:
        raise PlanError(
            f"the traced model has {traced.num_stages} stages but the plan has "
            f"{plan.num_stages}; a split point may be inside a module that is called twice"
        )
    for st, args in zip(plan.stages, traced.args, strict=True):
        st.receives = [_describe(w, traced) for w in args]
        st.sends = []
    for k, args in enumerate(traced.args):
        for w in args:
            if w.src == "stage":
                entry = {"to": f"stage{k}", **_describe(w, traced)}
                entry.pop("from")
                plan.stages[w.stage].sends.append(entry)
    for w in traced.outputs:
        if w.src == "stage":
            entry = {"to": "output", **_describe(w, traced)}
            entry.pop("from")
            plan.stages[w.stage].sends.append(entry)
    plan.outputs = [_describe(w, traced) for w in traced.outputs]
    plan.rows_mixed = traced.rows
    plan.output_tree = traced.output_tree


def unit_seconds(
    source: ModelSource,
    dtype: str | None,
    workload: Workload,
    profile_cache: str | Path | None = None,
) -> dict[str, float]:
    """Seconds per microbatch of each of the model's units (a plan's unit names), estimated
    on this machine's ``workload.device``: what a worker answers the planner with."""
    plan = make_plan(
        source,
        Policy.equal_size(1),
        dtype=dtype,
        trace=False,
        workload=workload,
        profile_cache=profile_cache,
    )
    return {u["name"]: float(u["seconds"]) for u in plan.units}
