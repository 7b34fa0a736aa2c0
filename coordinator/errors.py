"""The coordinator's domain errors.  The core raises these (never gRPC status codes); each
names the status it ends a call with in ``status``, and ``pipeserve.rpc.abort_for`` -- the one
mapping of errors to status codes -- reads it at the edge."""

from __future__ import annotations

from pipeline_core.errors import clip

__all__ = [
    "AlreadyExists",
    "CoordinatorError",
    "InvalidRequest",
    "LimitReached",
    "NotFound",
    "NotReady",
    "OutOfRange",
    "PermissionDenied",
    "Unavailable",
    "UpstreamError",
    "WorkerCallFailed",
    "clip",
]


class CoordinatorError(Exception):
    """A request the coordinator cannot serve; ``str(e)`` says what was wrong and what to do."""

    status = "INTERNAL"


class InvalidRequest(CoordinatorError):
    status = "INVALID_ARGUMENT"


class NotFound(CoordinatorError):
    status = "NOT_FOUND"


class AlreadyExists(CoordinatorError):
    status = "ALREADY_EXISTS"


class PermissionDenied(CoordinatorError):
    status = "PERMISSION_DENIED"


class NotReady(CoordinatorError):
    """The model or cluster is not in a state to do it (not ready, too few workers)."""

    status = "FAILED_PRECONDITION"


class Unavailable(CoordinatorError):
    """The model cannot serve now (recovering, waiting for a spare); retry later."""

    status = "UNAVAILABLE"


class LimitReached(CoordinatorError):
    """A bound was reached (streams per client, workers, the rendezvous store)."""

    status = "RESOURCE_EXHAUSTED"


class OutOfRange(CoordinatorError):
    status = "OUT_OF_RANGE"


class WorkerCallFailed(CoordinatorError):
    """A call to a worker failed (unreachable, refused)."""

    status = "UNAVAILABLE"


class UpstreamError(CoordinatorError):
    """A worker ended a relayed call with ``status`` (a status name); ``lost``: the code may
    mean the pipeline lost a worker (the relay waits for a recovery and replays)."""

    def __init__(self, status: str, message: str, lost: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.lost = lost
