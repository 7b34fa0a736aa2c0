"""How the coordinator's core talks to a stage worker: a small interface that the gRPC
client (:mod:`coordinator.grpc_client`) and in-process fakes (the core's unit tests)
implement.  Every method raises :class:`coordinator.errors.WorkerCallFailed` when the call
fails; ``generate`` streams raise :class:`coordinator.errors.UpstreamError`.

Requests and responses that the coordinator only relays (Generate, Forward, Timeline) pass
through as the API's messages: the core never looks inside more than the relay needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from .records import WorkerStatus

__all__ = ["Assignment", "Profile", "UpstreamCall", "WorkerClient"]


@dataclass(frozen=True, kw_only=True)
class Assignment:
    """One stage of one model for one worker."""

    model: str
    plan_json: str
    stage: int
    world_size: int
    epoch: int
    device: str
    mode: str


@dataclass(frozen=True)
class Profile:
    unit_seconds: dict[str, float]
    device_name: str


class UpstreamCall(Protocol):
    """A streamed call on a worker: iterate its responses; ``cancel`` ends it."""

    def __iter__(self) -> Iterator[Any]: ...

    def cancel(self) -> Any: ...


class WorkerClient(Protocol):
    def assign(self, a: Assignment, timeout: float) -> None: ...

    def status(self, timeout: float) -> WorkerStatus: ...

    def release(self, model: str, abandon: bool, timeout: float) -> None: ...

    def profile(
        self, checkpoint: str, dtype: str, batch: int, seq: int, chunks: int, timeout: float
    ) -> Profile: ...

    def generate(self, request: Any, timeout: float | None, request_id: str) -> UpstreamCall: ...

    def forward(self, request: Any, timeout: float | None) -> Any: ...

    def timeline(self, request: Any, timeout: float) -> list[Any]: ...
