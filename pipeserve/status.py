"""How errors leave a pipeserve server: the one mapping from exceptions to gRPC status codes,
and how much of a caller's own string an error message may repeat."""

from __future__ import annotations

import logging

import grpc

from pipeline_core import (
    CheckpointError,
    DoesNotFit,
    GenerationFailed,
    PlanError,
    RequestError,
    ResourceExhausted,
    TraceError,
)
from pipeline_core.errors import ECHO_CHARS, clip

__all__ = ["ECHO_CHARS", "abort_for", "clip"]

log = logging.getLogger(__name__)


def abort_for(context: grpc.ServicerContext, e: BaseException) -> None:
    """End the call with the status code that fits ``e`` (raises)."""
    if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
        context.abort(e.code(), e.details() or str(e))
    status = getattr(e, "status", None)  # a domain error names its status (coordinator.errors)
    if isinstance(status, str) and status in grpc.StatusCode.__members__:
        context.abort(grpc.StatusCode[status], str(e))
    if isinstance(e, DoesNotFit):  # the request is fine; the cluster is too small for it
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    if isinstance(e, RequestError | ValueError | TypeError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if isinstance(e, ResourceExhausted):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    if isinstance(e, PlanError | FileNotFoundError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if isinstance(e, TraceError | CheckpointError):  # the model or its files, not the server
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    if isinstance(e, GenerationFailed):
        context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
    log.exception("internal error")
    context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
