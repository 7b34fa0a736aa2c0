"""pipeline_core: plan, split, load and run any PyTorch model by stages. Pure torch, no gRPC.

[Note: one plan, one shard loader, stage forms by purpose]
* Planning happens on the *meta* device: :func:`make_plan` builds the model skeleton (no weight
  memory), finds its natural blocks (:mod:`.units`), splits them (:mod:`.split`) by time
  (``balanced``, the default: unit times profiled on the target device, KV bytes per token,
  worker memory and speed -- :mod:`.cost`), by bytes, or at given points, and writes a JSON
  :class:`Plan` naming every tensor each stage owns, with predicted stage times.
* A forward stage is a slice of the model captured by ``torch.export`` and split by
  ``torch.distributed.pipelining`` (:mod:`.trace`): it works for *any* model that exports (HF
  or not, CNNs included) with dynamic batch/sequence sizes, and one code path serves all
  families.  Export cannot carry a KV cache (``DynamicCache`` is not a pytree), so generation
  builds its stages from the original HF modules of the same units, from the same plan, with the
  same shard loader: the plan's unit boundaries are module boundaries in both forms.
* Generation (:mod:`.gen_stage`, :mod:`.stage_loop`, :mod:`.engine`, :mod:`.ring`): the same
  units of the original HF modules run with a per-stage KV cache; stage 0 schedules
  micro-batches of sequences (continuous batching, under one :mod:`.kv_budget`), the last stage
  samples, token ids go back to stage 0 around a ring of typed messages
  (:mod:`.ring_messages`, the only code that knows their wire layout).
* Loading reads only the stage's tensors from the checkpoint index (:mod:`.load`).
* Activations move over ``torch.distributed`` point-to-point with a header per message
  (:mod:`.transport`); the fill-drain schedule is data (:mod:`.schedule`) interpreted by
  :mod:`.runtime`; :mod:`.stage_procs` starts stage processes on this machine, for
  :mod:`.local` (forward) and :mod:`.local_generate` alike.  Every exception class is in
  :mod:`.errors`; nothing here reads the environment (callers pass paths and levels in).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Each name is imported from its module on first use (PEP 562): a process that needs one part
# (a coordinator planning, a worker serving generation stages, a CLI client) does not pay for
# importing torch.distributed.pipelining and torch.export, which only forward stages use --
# about half of every ``python -m pipeserve`` process's start-up.
_WHERE = {
    "pipe_split": "torch.distributed.pipelining",
    "Workload": ".cost",
    "EngineLimits": ".engine",
    "GenerationEngine": ".engine",
    "GenerationFailed": ".engine",
    "RequestHandle": ".engine",
    "CheckpointError": ".errors",
    "DoesNotFit": ".errors",
    "PlanError": ".errors",
    "TraceError": ".errors",
    "TransportError": ".errors",
    "GenStage": ".gen_stage",
    "UnsupportedModelError": ".gen_stage",
    "InProcessPipeline": ".inprocess",
    "CheckpointIndex": ".load",
    "ReadStats": ".load",
    "read_tensors": ".load",
    "LocalPipeline": ".local",
    "LocalGenerator": ".local_generate",
    "PLAN_VERSION": ".plan",
    "Plan": ".plan",
    "Policy": ".plan",
    "StagePlan": ".plan",
    "make_plan": ".plan",
    "RequestError": ".sampling",
    "ResourceExhausted": ".sampling",
    "SamplingParams": ".sampling",
    "InputSpec": ".source",
    "ModelSource": ".source",
    "build_skeleton": ".source",
    "Stage": ".stage",
    "build_stage": ".stage",
    "build_stages": ".stage",
    "Unit": ".units",
    "find_units": ".units",
}

if TYPE_CHECKING:
    from torch.distributed.pipelining import pipe_split

    from .cost import Workload
    from .engine import EngineLimits, GenerationEngine, GenerationFailed, RequestHandle
    from .errors import CheckpointError, DoesNotFit, PlanError, TraceError, TransportError
    from .gen_stage import GenStage, UnsupportedModelError
    from .inprocess import InProcessPipeline
    from .load import CheckpointIndex, ReadStats, read_tensors
    from .local import LocalPipeline
    from .local_generate import LocalGenerator
    from .plan import PLAN_VERSION, Plan, Policy, StagePlan, make_plan
    from .sampling import RequestError, ResourceExhausted, SamplingParams
    from .source import InputSpec, ModelSource, build_skeleton
    from .stage import Stage, build_stage, build_stages
    from .units import Unit, find_units


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value  # once: later look-ups do not come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = [
    "PLAN_VERSION",
    "CheckpointError",
    "CheckpointIndex",
    "DoesNotFit",
    "EngineLimits",
    "GenStage",
    "GenerationEngine",
    "GenerationFailed",
    "InProcessPipeline",
    "InputSpec",
    "LocalGenerator",
    "LocalPipeline",
    "ModelSource",
    "Plan",
    "PlanError",
    "Policy",
    "ReadStats",
    "RequestError",
    "RequestHandle",
    "ResourceExhausted",
    "SamplingParams",
    "Stage",
    "StagePlan",
    "TraceError",
    "TransportError",
    "Unit",
    "UnsupportedModelError",
    "Workload",
    "build_skeleton",
    "build_stage",
    "build_stages",
    "find_units",
    "make_plan",
    "pipe_split",
    "read_tensors",
]
