"""What the coordinator knows: a worker (registered, heartbeating) and a model (its plan, the
workers of its stages, its epoch), each with an enum state.  A model's state changes only
through :meth:`ModelRecord.to`, which refuses a transition the life of a model does not have.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline_core import Plan

__all__ = [
    "LOST_AFTER_S",
    "ModelRecord",
    "ModelState",
    "WorkerRecord",
    "WorkerState",
    "WorkerStatus",
]

LOST_AFTER_S = 5.0
"""A worker whose heartbeats stop this long is lost (``--worker-timeout``)."""


class ModelState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"


_TRANSITIONS = {
    ModelState.LOADING: {ModelState.READY, ModelState.FAILED, ModelState.UNLOADING},
    ModelState.READY: {ModelState.LOADING, ModelState.UNLOADING},  # LOADING: re-forming
    ModelState.FAILED: {ModelState.UNLOADING},
    ModelState.UNLOADING: set(),
}


class WorkerState(enum.StrEnum):
    """What a worker is doing, as far as the coordinator can tell."""

    IDLE = "idle"
    LOADING = "loading"
    JOINING = "joining"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"
    LOST = "lost"


@dataclass
class WorkerStatus:
    """A worker's own report (each heartbeat, or a Status call)."""

    state: str = ""
    model: str = ""
    stage: int = 0
    epoch: int = 0
    error: str = ""
    bytes_loaded: int = 0
    bytes_total: int = 0
    kv_sequences: int = 0
    kv_bytes: int = 0
    rpc_bytes: int = 0


@dataclass
class WorkerRecord:
    id: str
    address: str
    device: str
    memory: int
    client: Any
    """The worker's :class:`coordinator.client.WorkerClient`."""
    status: WorkerStatus = field(default_factory=WorkerStatus)
    last_seen: float = field(default_factory=time.monotonic)
    draining: bool = False
    leaving: bool = False
    """Sent a leaving heartbeat (SIGTERM): its stage is moving to a spare; it exits after."""
    model: str = ""
    lost_after: float = LOST_AFTER_S
    seq: int = 0
    """Registration order (stages go to the earliest idle workers)."""
    speed: float = 0.0
    """Matmul GFLOP/s the worker measured (or was told) at start-up."""
    device_name: str = ""
    kv_tokens: int = 0

    @property
    def state(self) -> WorkerState:
        if time.monotonic() - self.last_seen > self.lost_after:
            return WorkerState.LOST
        if self.draining:
            return WorkerState.DRAINING
        try:
            return WorkerState(self.status.state or "idle")
        except ValueError:
            return WorkerState.FAILED

    def idle_now(self) -> None:
        """The worker dropped its stage (before its next heartbeat says so)."""
        self.status = WorkerStatus(state=WorkerState.IDLE)


@dataclass
class ModelRecord:
    name: str
    checkpoint: str
    plan: Plan
    workers: list[str]
    """The worker of each stage ("" for a stage not placed yet: restored, not relinked)."""
    epoch: int
    mode: str = "generate"
    state: ModelState = ModelState.LOADING
    error: str = ""
    device: str = ""
    calls: set[Any] = field(default_factory=set)
    """Upstream Generate calls in flight (cancelled when the pipeline must be re-formed)."""
    recovering: bool = False
    waiting: str = ""
    """Why recovery waits (no spare worker yet): requests fail fast with this message."""
    busy: threading.Lock = field(default_factory=threading.Lock)
    """Held by the recovery attempt under way (one at a time per model)."""
    attempts: int = 0
    """Failed recovery attempts in a row (the retry backoff grows with them)."""
    retry_at: float = 0.0

    def to(self, state: ModelState, error: str | None = None) -> None:
        """Move to ``state`` (with ``error``, when given); RuntimeError for a transition a
        model does not make (e.g. out of UNLOADING)."""
        if state is not self.state and state not in _TRANSITIONS[self.state]:
            raise RuntimeError(
                f"model {self.name!r}: no transition {self.state.name} -> {state.name}"
            )
        self.state = state
        if error is not None:
            self.error = error

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY
