"""The ``Plan``: which units, tensors and bytes each stage owns, and what it receives/sends.

A plan is made on the coordinator from the model skeleton (meta parameters: no weight memory)
and is plain, versioned JSON, so a worker on another host rebuilds exactly its stage from it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import split as policies
from .errors import PlanError
from .source import InputSpec, ModelSource, build_skeleton, default_inputs, parse_dtype
from .trace import WHOLE, TracedPipeline, Wire, call_order, trace_pipeline
from .units import Unit, find_units, stage_nbytes, tensor_table

__all__ = ["PLAN_VERSION", "Plan", "Policy", "StagePlan", "make_plan"]

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
            return f"balanced({self.stages}) by FLOPs" + (
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


def _starts(policy: Policy, units: list[Unit]) -> list[int]:
    sizes = [u.nbytes for u in units]
    names = [u.name for u in units]
    if policy.kind == "equal_size":
        return policies.equal_size(sizes, policy.stages, names)
    if policy.kind == "threshold":
        return policies.threshold(sizes, policy.max_bytes, names)
    if policy.kind == "manual":
        return policies.manual(names, policy.split_at)
    if policy.kind == "balanced":
        return policies.balanced(
            [u.flops for u in units],
            sizes,
            policy.stages,
            names,
            memory=policy.memory or None,
            speeds=policy.speeds or None,
        )
    raise PlanError(f"unknown split policy {policy.kind!r}")


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
    dtype: str | torch.dtype = "float32",
    trace: bool = True,
) -> Plan:
    """Plan ``source`` under ``policy`` on the meta device (no weight memory).

    With ``trace`` the model is also captured with ``torch.export`` (fake tensors) to record
    exactly what each stage receives and sends; ``markers`` always traces.
    """
    torch_dtype = parse_dtype(dtype)
    model = build_skeleton(source, torch_dtype)
    units = find_units(model)
    if not units:
        raise PlanError(f"model {type(model).__name__} has no submodules to split")
    infos, groups = tensor_table(model)
    inputs = inputs if inputs is not None else default_inputs(source, model)
    model_tensors = dict(model.named_parameters(remove_duplicate=False))
    model_tensors.update(model.named_buffers(remove_duplicate=False))
    by_name = {u.name: u for u in units}
    order, calls, flops = call_order(model, inputs, [u.name for u in units], is_hf=source.is_hf)
    for u in units:
        u.flops = flops[u.name]
    units = _merge_repeated([by_name[n] for n in order], calls, model_tensors)
    traced = None
    if policy.kind == "markers":
        traced = trace_pipeline(
            build_skeleton(source, torch_dtype), inputs, None, is_hf=source.is_hf
        )
        starts = _starts_from_markers(traced, units)
    else:
        starts = _starts(policy, units)
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
            )
        )
    plan = Plan(
        source=source,
        dtype=str(torch_dtype).removeprefix("torch."),
        inputs=inputs,
        policy=policy,
        units=[{"name": u.name, "nbytes": u.nbytes, "flops": u.flops} for u in units],
        stages=stages,
        tied={n: [a for a in g if a != n] for n, g in groups.items() if len(g) > 1},
    )
    if traced is None and trace and len(stages) > 1:
        traced = trace_pipeline(
            build_skeleton(source, torch_dtype), inputs, plan.split_points, is_hf=source.is_hf
        )
    if traced is not None:
        attach_wiring(plan, traced)
    return plan


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
