"""Build one runnable stage from a plan: trace, keep the stage's graph, load only its tensors.

The worker rebuilds the same skeleton and trace as the planner (both deterministic), keeps
graph module ``index`` and replaces its fake parameters with tensors read from the checkpoint.
Non-persistent buffers come from the skeleton (computed at construction); constants the export
lifted out of ``forward`` are already real.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor

from .errors import CheckpointError, PlanError
from .hf_keys import hf_checkpoint_keys
from .load import CheckpointIndex, ReadStats, read_tensors
from .plan import Plan
from .source import build_skeleton, parse_dtype
from .trace import TracedPipeline, Wire, model_name_of, trace_pipeline

__all__ = ["Stage", "build_stage", "build_stages", "trace_plan"]

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """One stage's module plus the wiring of the whole pipeline (to route values)."""

    index: int
    module: fx.GraphModule
    args: list[list[Wire]]
    outputs: list[Wire]
    device: torch.device
    stats: ReadStats = field(default_factory=ReadStats)

    @property
    def my_args(self) -> list[Wire]:
        return self.args[self.index]

    @torch.no_grad()
    def forward(self, args: list[Any]) -> Any:
        try:
            return self.module(*args)
        except Exception:
            if not _interpreted(self.module):
                raise
            log.warning("[stage %d] generated forward failed; interpreting the graph", self.index)
            return self.module(*args)  # same graph, node by node; raises a real input error


@dataclass
class Traced:
    skeleton: nn.Module
    """The model skeleton (its parameters are fake after tracing)."""
    pipeline: TracedPipeline
    buffers: dict[str, torch.Tensor]
    """The skeleton's real buffers by name, taken before tracing moved or faked anything."""


def trace_plan(plan: Plan, device: torch.device | str = "cpu") -> Traced:
    """Rebuild the skeleton and the traced split for ``plan``."""
    model = build_skeleton(plan.source, parse_dtype(plan.dtype))
    points = None if plan.policy.kind == "markers" else plan.split_points
    buffers = {n: b for n, b in model.named_buffers(remove_duplicate=False)}
    traced = trace_pipeline(model, plan.inputs, points, is_hf=plan.source.is_hf, device=device)
    if traced.num_stages != plan.num_stages:
        raise PlanError(
            f"plan has {plan.num_stages} stages but tracing produced {traced.num_stages}"
        )
    return Traced(model, traced, buffers)


def build_stage(
    plan: Plan,
    index: int,
    device: torch.device | str = "cpu",
    *,
    stats: ReadStats | None = None,
    on_traced: Callable[[], None] | None = None,
    huge_pages: bool = True,
) -> Stage:
    """Materialize stage ``index`` of ``plan`` on ``device`` from the checkpoint.

    ``on_traced`` is called after tracing, just before the checkpoint is read (memory probes).
    ``huge_pages``: weights on the CPU in one huge-page region (:mod:`.host_arena`).

    Raises:
        PlanError: index out of range or the plan does not match the traced model.
        CheckpointError: the checkpoint lacks a tensor or does not match.
    """
    if not 0 <= index < plan.num_stages:
        raise PlanError(f"stage {index} does not exist; the plan has {plan.num_stages} stages")
    device = torch.device(device)
    t = trace_plan(plan, device)
    gm = t.pipeline.modules[index]
    del t.pipeline.modules[:]  # other stages' graphs (fake tensors) are not needed
    if on_traced is not None:
        on_traced()
    stats = stats if stats is not None else ReadStats()
    return _load_stage(gm, plan, index, t, device, stats, huge_pages)


def build_stages(plan: Plan, device: torch.device | str = "cpu") -> list[Stage]:
    """Every stage of ``plan`` in this process, from one trace (what :func:`build_stage` does
    once per stage process): for running a plan's split in one process
    (:class:`~pipeline_core.inprocess.InProcessPipeline`)."""
    device = torch.device(device)
    t = trace_plan(plan, device)
    return [
        _load_stage(gm, plan, k, t, device, ReadStats()) for k, gm in enumerate(t.pipeline.modules)
    ]


def _load_stage(
    gm: fx.GraphModule,
    plan: Plan,
    index: int,
    t: Traced,
    device: torch.device,
    stats: ReadStats,
    huge_pages: bool = True,
) -> Stage:
    traced = t.pipeline
    _materialize(gm, plan, index, traced.prefix, t, device, stats, huge_pages)
    _compiled_python(gm)
    log.info("[stage %d] loaded %d bytes from %s", index, stats.total_bytes, plan.source.checkpoint)
    return Stage(
        index=index,
        module=gm,
        args=traced.args,
        outputs=traced.outputs,
        device=device,
        stats=stats,
    )


def _compiled_python(gm: nn.Module) -> None:
    """Run the stage's submodules as generated Python, not node by node.

    ``torch.export.unflatten`` builds ``InterpreterModule``s that walk their graph with
    ``torch.fx.Interpreter`` on every call (~750 nodes per decoder stage); their generated
    ``forward`` runs the same ops in the same order (same results, bit for bit) without the
    per-node Python overhead.
    """
    for m in _interpreter_modules(gm):
        # a graph value named ``self`` (BERT's attention has a submodule called ``self``)
        # would shadow the module in the generated code: keep those interpreted
        m._run_with_interpreter = any(n.name == "self" for n in m.graph.nodes)


def _interpreter_modules(gm: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in gm.modules()
        if getattr(m, "graph_module", None) is not None and hasattr(m, "_run_with_interpreter")
    ]


def _interpreted(gm: nn.Module) -> bool:
    """Switch every submodule back to the interpreter; False when all already were."""
    changed = False
    for m in _interpreter_modules(gm):
        changed |= not m._run_with_interpreter
        m._run_with_interpreter = True
    return changed


def _set_tensor(gm: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    owner = gm.get_submodule(mod_name) if mod_name else gm
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)


def _materialize(
    gm: fx.GraphModule,
    plan: Plan,
    index: int,
    prefix: str,
    traced: Traced,
    device: torch.device,
    stats: ReadStats,
    huge_pages: bool = True,
) -> None:
    skeleton_buffers = traced.buffers
    ckpt = CheckpointIndex.open(plan.source.checkpoint)
    if plan.source.is_hf:
        hf_checkpoint_keys(traced.skeleton, ckpt)
    owned = set(plan.stages[index].tensors)
    wanted: dict[str, tuple[str, list[int], torch.dtype]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        model_name = model_name_of(name).removeprefix(prefix)
        aliases = plan.tied.get(model_name, [])
        if model_name not in owned and not owned.intersection(aliases):
            raise PlanError(
                f"stage {index} uses {model_name!r}, which the plan gives to another stage; "
                "re-plan with this version of pipeserve"
            )
        wanted[name] = (ckpt.resolve(model_name, aliases), list(p.shape), p.dtype)
    for name, b in gm.named_buffers(remove_duplicate=False):
        model_name = model_name_of(name).removeprefix(prefix)
        aliases = plan.tied.get(model_name, [])
        in_ckpt = any(
            n in ckpt.weight_map or ckpt.renames.get(n) in ckpt.weight_map
            for n in (model_name, *aliases)
        )
        if model_name in owned and in_ckpt:
            wanted[name] = (ckpt.resolve(model_name, aliases), list(b.shape), b.dtype)
        elif model_name in skeleton_buffers:
            _set_tensor(gm, name, skeleton_buffers[model_name].to(device))
        elif isinstance(b, FakeTensor):
            raise CheckpointError(f"buffer {model_name!r} has no value in checkpoint or model")
        else:
            _set_tensor(gm, name, b.to(device))
    for name, t in read_tensors(ckpt, wanted, device, stats, huge_pages=huge_pages).items():
        _set_tensor(gm, name, t)
    for mod_name, mod in gm.named_modules():
        for attr, val in list(vars(mod).items()):
            if isinstance(val, torch.Tensor) and not isinstance(val, nn.Parameter):
                if isinstance(val, FakeTensor):
                    raise CheckpointError(f"{mod_name}.{attr} was not materialized")
                setattr(mod, attr, val.to(device))
    left = [
        n for n, t in [*gm.named_parameters(), *gm.named_buffers()] if isinstance(t, FakeTensor)
    ]
    if left:
        raise CheckpointError(f"stage {index}: tensors left without values: {left[:5]}")
