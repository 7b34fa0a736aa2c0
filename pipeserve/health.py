"""``grpc.health.v1`` for pipeserve's servers: one status per service name, set without ever
blocking the caller (see the [Note] below)."""

from __future__ import annotations

import queue
import threading
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pipeserve.status import clip

__all__ = ["NOT_SERVING", "SERVICE_UNKNOWN", "SERVING", "Health"]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class _HealthServicer(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1`` whose ``set`` never blocks.

    [Note: health never blocks a heartbeat] grpc's own servicer sends every status change to
    each ``Watch`` stream from inside ``set``, under its lock, and waits for the send to
    complete: one watcher that does not read (or a slow one) blocks every caller of ``set``
    -- the worker's heartbeat loop sets its health on every beat, the coordinator sets a
    model's health while holding its cluster lock -- so a stalled watcher made live workers
    "lost" and stalled the coordinator's heartbeats.  Here ``set`` only queues the change;
    each watcher's own call thread sends it, and watchers are bounded.
    """

    MAX_WATCHERS = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: dict[str, int] = {"": SERVING}
        self._watchers: dict[str, set[queue.SimpleQueue]] = {}
        self._shutting_down = False

    def set(self, service: str, status: int) -> None:
        with self._lock:
            if self._shutting_down or self._status.get(service) == status:
                return
            self._status[service] = status
            for q in self._watchers.get(service, ()):
                q.put(status)

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING from now on (as grpc's servicer does)."""
        with self._lock:
            for service in self._status:
                self._status[service] = NOT_SERVING
                for q in self._watchers.get(service, ()):
                    q.put(NOT_SERVING)
            self._shutting_down = True

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            status = self._status.get(request.service)
            known = sorted(self._status)
        if status is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no health status for service {clip(request.service)}; known: "
                f"{', '.join(repr(k) for k in known)[:2000]} (a model's is "
                "pipeserve.model.NAME)",
            )
        return health_pb2.HealthCheckResponse(status=status)

    def List(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            statuses = dict(self._status)
        return health_pb2.HealthListResponse(
            statuses={k: health_pb2.HealthCheckResponse(status=v) for k, v in statuses.items()}
        )

    def Watch(self, request: Any, context: grpc.ServicerContext) -> Any:
        service, q = request.service, queue.SimpleQueue()
        with self._lock:
            if sum(map(len, self._watchers.values())) >= self.MAX_WATCHERS:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{self.MAX_WATCHERS} health watchers already; use Check",
                )
            self._watchers.setdefault(service, set()).add(q)
            q.put(self._status.get(service, SERVICE_UNKNOWN))
        try:
            last = None
            while context.is_active():
                try:
                    status = q.get(timeout=1.0)
                except queue.Empty:
                    continue
                if status != last:
                    last = status
                    yield health_pb2.HealthCheckResponse(status=status)
        finally:
            with self._lock:
                self._watchers[service].discard(q)


class Health:
    """``grpc.health.v1`` with one status per service name ("" is the whole server)."""

    def __init__(self, server: grpc.Server) -> None:
        self.servicer = _HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    def set(self, service: str, serving: bool) -> None:
        self.servicer.set(service, SERVING if serving else NOT_SERVING)
