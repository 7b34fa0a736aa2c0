"""The coordinator's gRPC edge: thin servicers over :class:`coordinator.core.Coordinator`
(decode with :mod:`coordinator.codec`, call the core, encode; every error maps to its status
through ``rpc.abort_for``), the Prometheus collector, and the app's wiring:
:func:`create_server` builds it, :func:`serve` runs it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from pipeserve import rpc
from pipeserve.observe import CoordinatorMetrics, serve_metrics
from pipeserve.v1 import pipeserve_pb2 as pb
from pipeserve.v1 import pipeserve_pb2_grpc as pbg

from . import codec
from .config import CoordinatorConfig
from .core import Coordinator
from .edge import check_token, client_call, edge
from .placement import default_mode
from .registry import RegistryServicer
from .relay import Relay
from .store import StateStore

__all__ = ["SERVICES", "STOP_GRACE_S", "create_server", "serve"]

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
"""On SIGTERM: seconds calls in flight may finish (the manifests' terminationGracePeriodSeconds
exceed it)."""
SERVICES = ["pipeserve.v1.Inference", "pipeserve.v1.Admin", "pipeserve.v1.Registry"]
ALL_SERVICES = ["", *SERVICES, "inference.GRPCInferenceService"]


class InferenceServicer(pbg.InferenceServicer):
    """The client API."""

    def __init__(self, c: Coordinator, relay: Relay, token: str = "") -> None:
        self.c, self.relay, self.token = c, relay, token

    def authorize(self, context: grpc.ServicerContext) -> None:
        check_token(context, self.token, "client calls", "PIPESERVE_CLIENT_TOKEN")

    @edge
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Any:
        yield from self.relay.generate(request, client_call(context))

    @edge
    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> Any:
        return self.c.forward(request, rpc.remaining(context))

    @edge
    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> Any:
        with self.c.lock:
            return pb.ListModelsResponse(
                models=[codec.model_info(m) for m in self.c.models.values()]
            )


class AdminServicer(pbg.AdminServicer):
    """Admin API; with an admin token set, every call must carry the metadata
    ``authorization: Bearer <token>`` (else UNAUTHENTICATED)."""

    def __init__(self, c: Coordinator, token: str = "") -> None:
        self.c, self.token = c, token

    def authorize(self, context: grpc.ServicerContext) -> None:
        check_token(context, self.token, "admin calls", "PIPESERVE_ADMIN_TOKEN")

    def _mode(self, checkpoint: str) -> str:
        return default_mode(checkpoint, self.c.model_roots)

    @edge
    def PlanModel(self, request: pb.PlanModelRequest, context: grpc.ServicerContext) -> Any:
        plan, placed = self.c.plan(
            request.checkpoint,
            codec.policy(request.policy),
            request.dtype,
            rpc.workload_from_proto(request.workload),
            mode=self._mode(request.checkpoint),
        )
        return codec.plan_response(plan, placed)

    @edge
    def LoadModel(self, request: pb.LoadModelRequest, context: grpc.ServicerContext) -> Any:
        name = request.name or Path(request.checkpoint).name
        progress = self.c.load(
            name,
            request.checkpoint,
            codec.policy(request.policy),
            request.dtype,
            rpc.workload_from_proto(request.workload),
            mode=request.mode or self._mode(request.checkpoint),
            device=request.device,
            is_active=context.is_active,
        )
        for p in progress:
            yield codec.progress(p)

    @edge
    def UnloadModel(self, request: pb.UnloadModelRequest, context: grpc.ServicerContext) -> Any:
        self.c.unload(request.name)
        return pb.UnloadModelResponse()

    @edge
    def ClusterStatus(self, request: pb.ClusterStatusRequest, context: Any) -> Any:
        now = time.monotonic()
        with self.c.lock:
            workers = [codec.worker_info(w, now) for w in self.c.workers.values()]
            models = [codec.model_info(m) for m in self.c.models.values()]
        return pb.ClusterStatusResponse(workers=workers, models=models)

    @edge
    def Timeline(self, request: pb.TimelineRequest, context: grpc.ServicerContext) -> Any:
        events = self.c.timeline(request)
        return pb.TimelineResponse(events=sorted(events, key=lambda e: (e.stage, e.start)))

    @edge
    def DrainWorker(self, request: pb.DrainWorkerRequest, context: grpc.ServicerContext) -> Any:
        self.c.drain(request.worker_id)
        return pb.DrainWorkerResponse()


class _ClusterCollector:
    """Cluster figures read at scrape time: heartbeat age per worker, models by state."""

    def __init__(self, c: Coordinator) -> None:
        self.c = c

    def collect(self) -> Iterator[Any]:
        age = GaugeMetricFamily(
            "pipeserve_worker_heartbeat_age_seconds",
            "Seconds since the last heartbeat",
            labels=["worker", "state"],
        )
        models = GaugeMetricFamily("pipeserve_models", "Models by state", labels=["model", "state"])
        now = time.monotonic()
        with self.c.lock:
            for w in self.c.workers.values():
                age.add_metric([w.id, w.state.value], now - w.last_seen)
            for m in self.c.models.values():
                models.add_metric([m.name, pb.ModelState.Name(codec.model_state(m.state))], 1)
        yield age
        yield models


def create_server(
    config: CoordinatorConfig, registry: CollectorRegistry | None = None
) -> tuple[grpc.Server, int, Coordinator]:
    """The coordinator's gRPC server bound to ``config``'s host and port (0: a free one),
    every service added, not started; its port; the core (restored from ``state_db``; its
    ``health`` is the server's).  Metrics go to ``registry`` (default: a fresh one)."""
    server, port, health, _ = rpc.make_server(
        rpc.host_port(config.host, config.port), [*SERVICES, "inference.GRPCInferenceService"]
    )
    c = Coordinator(
        health,
        lost_after=config.worker_timeout,
        model_roots=[Path(r) for r in config.model_roots],
        max_streams_per_client=config.max_streams_per_client,
        state=StateStore(config.state_db) if config.state_db else None,
    )
    # [Note: KServe protos] imported here, not at the top: a process that also loads
    # tritonclient's copy of the same protos (tests) must be able to import this module
    from .kserve import KServeServicer

    registry = registry or CollectorRegistry()
    registry.register(_ClusterCollector(c))
    relay = Relay(c, CoordinatorMetrics(registry), rpc.check_generate)
    pbg.add_InferenceServicer_to_server(InferenceServicer(c, relay, config.client_token), server)
    pbg.add_AdminServicer_to_server(AdminServicer(c, config.admin_token), server)
    pbg.add_RegistryServicer_to_server(RegistryServicer(c, config.worker_token), server)
    KServeServicer(c, relay, config.client_token).add_to(server)
    return server, port, c


def serve(
    config: CoordinatorConfig,
    *,
    stop: threading.Event | None = None,
    ready: Callable[[int], Any] | None = None,
) -> None:
    """Run the coordinator until ``stop`` is set (or forever)."""
    registry = CollectorRegistry()
    server, port, c = create_server(config, registry)
    health = c.health
    host = config.host
    if c.models:
        log.info("restored %d model(s) from %s", len(c.models), config.state_db)
    serve_metrics(registry, config.metrics_port, host if host not in ("", "::") else "0.0.0.0")
    server.start()
    for s in ALL_SERVICES:
        health.set(s, True)
    health_server = (
        rpc.serve_health_only(health, rpc.host_port(host, config.health_port))
        if config.health_port
        else None
    )
    advertise = config.advertise_host or (
        host if host not in ("0.0.0.0", "::", "") else socket.getfqdn()
    )
    log.info("coordinator listening on %s", rpc.host_port(advertise, port))
    if ready is not None:
        ready(port)
    stop = stop or threading.Event()
    threading.Thread(target=c.monitor, args=(stop,), name="monitor", daemon=True).start()
    stop.wait()
    # [Note: stopping] take no new calls (health NOT_SERVING, the server refuses), give calls
    # in flight STOP_GRACE_S, then exit; deployments live on in --state-db, and the workers
    # keep their stages and relink when a coordinator comes back.
    for s in ALL_SERVICES:
        health.set(s, False)
    log.info("coordinator stopping (%.0f s grace for calls in flight)", STOP_GRACE_S)
    server.stop(grace=STOP_GRACE_S).wait()
    if health_server is not None:
        health_server.stop(grace=1).wait()
