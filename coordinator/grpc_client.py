""":class:`coordinator.client.WorkerClient` over gRPC: the worker's ``StageWorker`` service,
every call carrying the worker's control token.  gRPC errors become the core's errors here."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from pipeserve import rpc
from pipeserve.v1 import pipeserve_pb2 as pb
from pipeserve.v1 import pipeserve_pb2_grpc as pbg

from . import codec
from .client import Assignment, Profile
from .errors import UpstreamError, WorkerCallFailed
from .records import WorkerStatus

__all__ = ["GrpcWorkerClient"]

_LOST = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}
"""Upstream codes that may mean the pipeline lost a worker (the relay waits for recovery
and replays); any other code is the request's own answer and goes to the client at once."""


def _failed(e: grpc.RpcError) -> WorkerCallFailed:
    return WorkerCallFailed(e.details() or str(e.code()))


def _upstream(e: grpc.RpcError) -> UpstreamError:
    return UpstreamError(e.code().name, e.details() or "", lost=e.code() in _LOST)


class _Call:
    def __init__(self, call: Any) -> None:
        self.call = call

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self.call
        except grpc.RpcError as e:
            raise _upstream(e) from e

    def cancel(self) -> Any:
        return self.call.cancel()


class GrpcWorkerClient:
    def __init__(self, address: str, control_token: str) -> None:
        self.stub = pbg.StageWorkerStub(rpc.with_token(rpc.channel(address), control_token))

    def assign(self, a: Assignment, timeout: float) -> None:
        try:
            self.stub.Assign(
                pb.AssignRequest(
                    model=a.model,
                    plan_json=a.plan_json,
                    stage=a.stage,
                    world_size=a.world_size,
                    epoch=a.epoch,
                    device=a.device,
                    mode=a.mode,
                ),
                timeout=timeout,
            )
        except grpc.RpcError as e:
            raise _failed(e) from e

    def status(self, timeout: float) -> WorkerStatus:
        try:
            return codec.worker_status(self.stub.Status(pb.StatusRequest(), timeout=timeout))
        except grpc.RpcError as e:
            raise WorkerCallFailed(f"unreachable: {e.code()}") from e

    def release(self, model: str, abandon: bool, timeout: float) -> None:
        try:
            self.stub.Release(pb.ReleaseRequest(model=model, abandon=abandon), timeout=timeout)
        except grpc.RpcError as e:
            raise WorkerCallFailed(str(e.code())) from e

    def profile(
        self, checkpoint: str, dtype: str, batch: int, seq: int, chunks: int, timeout: float
    ) -> Profile:
        req = pb.ProfileRequest(
            checkpoint=checkpoint,
            dtype=dtype,
            workload=pb.Workload(batch=batch, seq=seq, chunks=chunks),
        )
        try:
            r = self.stub.Profile(req, timeout=timeout)
        except grpc.RpcError as e:
            raise _failed(e) from e
        return Profile(dict(r.unit_seconds), r.device_name)

    def generate(self, request: Any, timeout: float | None, request_id: str) -> _Call:
        md = (("x-request-id", request_id),) if request_id else None
        try:
            return _Call(self.stub.Generate(request, timeout=timeout, metadata=md))
        except grpc.RpcError as e:
            raise _upstream(e) from e

    def forward(self, request: Any, timeout: float | None) -> Any:
        try:
            return self.stub.Forward(request, timeout=timeout)
        except grpc.RpcError as e:
            raise UpstreamError(e.code().name, e.details() or "") from e

    def timeline(self, request: Any, timeout: float) -> list[Any]:
        try:
            return list(self.stub.Timeline(request, timeout=timeout).events)
        except grpc.RpcError as e:
            raise WorkerCallFailed(str(e.code())) from e
