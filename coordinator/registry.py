"""The coordinator's ``Registry`` service: workers register and heartbeat, and the data
plane's rendezvous keys live in a bounded key-value store (:mod:`coordinator.rendezvous`).

With a worker token (``PIPESERVE_WORKER_TOKEN``) every call must carry it, so a stray process
cannot join a pipeline; without it registration is open (the coordinator says so at start-up
and binds to 127.0.0.1 unless ``--host`` says otherwise).
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from pipeserve.v1 import pipeserve_pb2 as pb
from pipeserve.v1 import pipeserve_pb2_grpc as pbg

from . import codec
from .core import Coordinator
from .edge import check_token, edge
from .errors import InvalidRequest
from .grpc_client import GrpcWorkerClient

__all__ = ["HEARTBEAT_MS", "RegistryServicer", "default_host"]

log = logging.getLogger(__name__)

HEARTBEAT_MS = 500
MAX_ADDRESS = 512
MAX_WORKER_ID = 253


def default_host(host: str | None, *, mutual_tls: bool, worker_token: bool) -> str:
    """The address the coordinator binds: ``host`` if given, else all interfaces when
    registration is guarded (a worker token or mutual TLS), else 127.0.0.1.  Open
    registration is said loudly: anyone who reaches the port can join a pipeline."""
    guarded = worker_token or mutual_tls
    if not guarded:
        log.warning(
            "registration is OPEN: PIPESERVE_WORKER_TOKEN is not set and there is no mutual "
            "TLS, so anyone who reaches this port can register a worker and use the "
            "rendezvous store; %s",
            f"listening on {host} as asked"
            if host
            else "listening on 127.0.0.1 only (pass --host to listen elsewhere)",
        )
    return host or ("0.0.0.0" if guarded else "127.0.0.1")


def _check_register(r: pb.RegisterRequest) -> None:
    if not r.address or len(r.address) > MAX_ADDRESS:
        raise InvalidRequest(
            f"register needs the worker's host:port (at most {MAX_ADDRESS} characters)"
        )
    if len(r.worker_id) > MAX_WORKER_ID:
        raise InvalidRequest(
            f"worker_id is at most {MAX_WORKER_ID} characters (a pod name is at most 253)"
        )
    if not r.control_token:
        raise InvalidRequest(
            "register needs the worker's control_token (every StageWorker call carries it); "
            "upgrade the worker"
        )


class RegistryServicer(pbg.RegistryServicer):
    def __init__(self, c: Coordinator, token: str = "") -> None:
        self.c, self.token = c, token

    def authorize(self, context: grpc.ServicerContext) -> None:
        check_token(context, self.token, "workers", "PIPESERVE_WORKER_TOKEN")

    @edge
    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> Any:
        _check_register(request)
        # the coordinator's calls carry the worker's secret: nobody else may drive a worker
        client = GrpcWorkerClient(request.address, request.control_token)
        wid = self.c.register(request.address, client, **codec.register_fields(request))
        return pb.RegisterResponse(worker_id=wid, heartbeat_interval_ms=HEARTBEAT_MS)

    @edge
    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> Any:
        status = codec.worker_status(request.status)
        known, may_exit = self.c.heartbeat(request.worker_id, status, leave=request.leaving)
        return pb.HeartbeatResponse(known=known, may_exit=may_exit)

    @edge
    def StoreSet(self, request: pb.StoreSetRequest, context: grpc.ServicerContext) -> Any:
        self.c.store.set(request.key, request.value)
        return pb.StoreSetResponse()

    @edge
    def StoreWait(self, request: pb.StoreWaitRequest, context: grpc.ServicerContext) -> Any:
        values = self.c.store.wait(list(request.keys), request.timeout_s, context.is_active)
        if values is None:
            return pb.StoreWaitResponse(found=False)
        return pb.StoreWaitResponse(found=True, values=values)

    @edge
    def StoreAdd(self, request: pb.StoreAddRequest, context: grpc.ServicerContext) -> Any:
        return pb.StoreAddResponse(value=self.c.store.add(request.key, request.amount))
