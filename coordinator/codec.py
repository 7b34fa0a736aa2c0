"""``pipeserve.v1`` messages <-> the coordinator's domain objects, in one place."""

from __future__ import annotations

from typing import Any

from pipeline_core import Plan, Policy
from pipeserve.codec import policy_from_proto
from pipeserve.v1 import pipeserve_pb2 as pb

from .core import Progress
from .placement import Placement, stage_workers
from .records import ModelRecord, ModelState, WorkerRecord, WorkerStatus

__all__ = [
    "model_info",
    "model_state",
    "plan_response",
    "policy",
    "progress",
    "register_fields",
    "worker_info",
    "worker_status",
]


def model_state(s: ModelState) -> int:
    return pb.ModelState.Value(f"MODEL_STATE_{s.name}")


def worker_status(s: pb.WorkerStatus) -> WorkerStatus:
    return WorkerStatus(
        state=s.state,
        model=s.model,
        stage=s.stage,
        epoch=s.epoch,
        error=s.error,
        bytes_loaded=s.bytes_loaded,
        bytes_total=s.bytes_total,
        kv_sequences=s.kv_sequences,
        kv_bytes=s.kv_bytes,
        rpc_bytes=s.rpc_bytes,
    )


def policy(p: pb.SplitPolicy) -> Policy:
    """The split policy; ``balanced`` (by time) when none is set."""
    return policy_from_proto(p)


def model_info(m: ModelRecord) -> pb.ModelInfo:
    inputs = []
    if m.mode == "forward":
        for spec in m.plan.inputs:
            shape = [-1 if d in spec.dynamic else n for d, n in enumerate(spec.shape)]
            inputs.append(pb.Tensor(name=spec.name, dtype=spec.dtype, shape=shape))
    return pb.ModelInfo(
        name=m.name,
        state=model_state(m.state),
        checkpoint=m.checkpoint,
        num_stages=m.plan.num_stages,
        capabilities=[m.mode],
        error=m.error,
        epoch=m.epoch,
        inputs=inputs,
        dtype=m.plan.dtype,
    )


def worker_info(w: WorkerRecord, now: float) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        id=w.id,
        address=w.address,
        device=w.device,
        state=w.state.value,
        memory_bytes=w.memory,
        model=w.model,
        stage=w.status.stage,
        seconds_since_heartbeat=now - w.last_seen,
        kv_sequences=w.status.kv_sequences,
        kv_bytes=w.status.kv_bytes,
        speed_gflops=w.speed,
        device_name=w.device_name,
        rpc_bytes=w.status.rpc_bytes,
    )


def progress(p: Progress) -> pb.LoadProgress:
    return pb.LoadProgress(
        model=p.model,
        stages=[
            pb.StageProgress(
                stage=s.stage,
                worker_id=s.worker_id,
                bytes_loaded=s.bytes_loaded,
                bytes_total=s.bytes_total,
                state=s.state,
                error=s.error,
            )
            for s in p.stages
        ],
        done=p.done,
        state=model_state(p.state),
        dtype=p.dtype,
    )


def plan_response(plan: Plan, placed: Placement | None) -> pb.PlanModelResponse:
    timed = bool(plan.estimate)
    total = sum(s.seconds if timed else s.flops for s in plan.stages) or 1
    chosen = stage_workers(plan, placed)
    return pb.PlanModelResponse(
        plan_json=plan.dumps(),
        stages=[
            pb.StageSummary(
                stage=s.index,
                bytes=s.nbytes,
                units=s.units,
                compute_fraction=(s.seconds if timed else s.flops) / total,
                seconds=s.seconds,
                kv_bytes_per_token=s.kv_bytes_per_token,
                worker_id=chosen[s.index].id if chosen else "",
            )
            for s in plan.stages
        ],
        samples_per_s=plan.estimate.get("samples_per_s", 0.0),
        bubble=plan.estimate.get("bubble", 0.0),
        streaming_samples_per_s=plan.estimate.get("streaming_samples_per_s", 0.0),
        times_from=placed.times_from if placed else ("flops" if timed else ""),
    )


def register_fields(r: pb.RegisterRequest) -> dict[str, Any]:
    """The worker's facts from its RegisterRequest, as ``Coordinator.register`` takes them."""
    return {
        "worker_id": r.worker_id,
        "device": r.device,
        "memory": r.memory_bytes,
        "speed": r.speed_gflops,
        "device_name": r.device_name,
        "kv_tokens": r.kv_tokens,
    }
