"""The coordinator's ``Registry`` service: workers register and heartbeat, and the data
plane's rendezvous keys live in a bounded key-value store.

With ``PIPESERVE_WORKER_TOKEN`` set every call must carry it, so a stray process cannot join
a pipeline; without it registration is open (the coordinator says so at start-up and binds
to 127.0.0.1 unless ``--host`` says otherwise).  Either way the store is bounded (key and
value sizes, number of keys, total bytes), so a caller cannot grow the coordinator's memory.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import grpc

from pipeserve import rpc
from pipeserve.v1 import pipeserve_pb2 as pb
from pipeserve.v1 import pipeserve_pb2_grpc as pbg

from .leaving import leave
from .server import HEARTBEAT_MS, Coordinator, WorkerRecord, _check_token

__all__ = [
    "MAX_KEYS",
    "MAX_STORE_BYTES",
    "MAX_VALUE_BYTES",
    "MAX_WORKERS",
    "RegistryServicer",
    "default_host",
]

log = logging.getLogger(__name__)

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 1 << 20
"""Rendezvous values are addresses and small JSON records; nothing near this."""
MAX_KEYS = 10_000
MAX_STORE_BYTES = 16 << 20
MAX_WORKERS = 1024
"""Worker records at once (lost idle workers are pruned, so this bounds a registration flood)."""
MAX_ADDRESS = 512
MAX_WORKER_ID = 253


def default_host(host: str | None, mutual_tls: bool) -> str:
    """The address the coordinator binds: ``host`` if given, else all interfaces when
    registration is guarded (``PIPESERVE_WORKER_TOKEN`` or mutual TLS), else 127.0.0.1.
    Open registration is said loudly: anyone who reaches the port can join a pipeline."""
    guarded = bool(os.environ.get("PIPESERVE_WORKER_TOKEN")) or mutual_tls
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


def _too_big(what: str, n: int, limit: int) -> str:
    return f"{what} is {n} bytes; at most {limit}"


class RegistryServicer(pbg.RegistryServicer):
    """Workers register and heartbeat; with ``PIPESERVE_WORKER_TOKEN`` set they must present
    it, so a stray process cannot join a pipeline."""

    def __init__(self, c: Coordinator) -> None:
        self.c = c
        self.token = os.environ.get("PIPESERVE_WORKER_TOKEN", "")

    def _authorize(self, context: grpc.ServicerContext) -> None:
        if self.token:
            _check_token(context, self.token, "workers", "PIPESERVE_WORKER_TOKEN")

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        if not request.address or len(request.address) > MAX_ADDRESS:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"register needs the worker's host:port (at most {MAX_ADDRESS} characters)",
            )
        if len(request.worker_id) > MAX_WORKER_ID:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"worker_id is at most {MAX_WORKER_ID} characters (a pod name is at most 253)",
            )
        if not request.control_token:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "register needs the worker's control_token (every StageWorker call carries "
                "it); upgrade the worker",
            )
        with self.c.lock:
            full = len(self.c.workers) >= MAX_WORKERS
        if full:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{MAX_WORKERS} workers are registered already (the limit)",
            )
        # the coordinator's calls carry the worker's secret: nobody else may drive a worker
        stub = pbg.StageWorkerStub(
            rpc.with_token(rpc.channel(request.address), request.control_token)
        )
        with self.c.lock:
            seq = next(self.c._ids)
            # unique across coordinator restarts: a worker heartbeating with an id from the
            # previous coordinator must not be mistaken for a new one
            wid = request.worker_id or f"w{seq}-{self.c.instance}"  # a pod's stable name
            while wid in self.c.workers:  # taken (never overwrite a live record)
                seq = next(self.c._ids)
                wid = f"{request.worker_id or 'w'}-{seq}-{self.c.instance}"
            self.c.workers[wid] = WorkerRecord(
                wid,
                request.address,
                request.device,
                request.memory_bytes,
                stub,
                lost_after=self.c.lost_after,
                seq=seq,
                speed=request.speed_gflops,
                device_name=request.device_name,
                kv_tokens=request.kv_tokens,
            )
        log.info("worker %s registered from %s", wid, request.address)
        return pb.RegisterResponse(worker_id=wid, heartbeat_interval_ms=HEARTBEAT_MS)

    def _put(self, key: str, value: bytes, context: grpc.ServicerContext) -> None:
        """Store ``key`` (the caller holds the lock): RESOURCE_EXHAUSTED past the bounds."""
        kv = self.c.kv
        old = len(kv[key]) if key in kv else None
        used = self.c.kv_bytes - (old or 0) + len(value)
        if old is None and len(kv) >= MAX_KEYS:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the rendezvous store holds {MAX_KEYS} keys (the limit)",
            )
        if used > MAX_STORE_BYTES:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the rendezvous store would hold {used} bytes; at most {MAX_STORE_BYTES}",
            )
        kv[key] = value
        self.c.kv_bytes = used
        self.c.changed.notify_all()

    def _check_key(self, key: str, context: grpc.ServicerContext) -> None:
        if not key or len(key.encode()) > MAX_KEY_BYTES:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a rendezvous key has 1 to {MAX_KEY_BYTES} bytes (got {len(key.encode())})",
            )

    def StoreSet(self, request: pb.StoreSetRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        self._check_key(request.key, context)
        if len(request.value) > MAX_VALUE_BYTES:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                _too_big("a rendezvous value", len(request.value), MAX_VALUE_BYTES),
            )
        with self.c.changed:
            self._put(request.key, request.value, context)
        return pb.StoreSetResponse()

    def StoreWait(self, request: pb.StoreWaitRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        keys = list(request.keys)
        if len(keys) > 1024:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "wait for at most 1024 keys at once")
        for k in keys:
            self._check_key(k, context)
        timeout = request.timeout_s if request.timeout_s == request.timeout_s else 0.0  # NaN
        deadline = time.monotonic() + max(0.0, min(timeout, 600.0))
        with self.c.changed:
            while not all(k in self.c.kv for k in keys):
                left = deadline - time.monotonic()
                if left <= 0 or not context.is_active():
                    return pb.StoreWaitResponse(found=False)
                self.c.changed.wait(min(left, 1.0))
            return pb.StoreWaitResponse(found=True, values=[self.c.kv[k] for k in keys])

    def StoreAdd(self, request: pb.StoreAddRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        self._check_key(request.key, context)
        with self.c.changed:
            old = self.c.kv.get(request.key, b"0")
            try:
                value = int(old) + request.amount
            except ValueError:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"rendezvous key {request.key[:80]!r} holds a value that is not an integer; "
                    "StoreAdd counts only integer keys",
                )
            if not -(2**63) <= value < 2**63:
                context.abort(grpc.StatusCode.OUT_OF_RANGE, "the counter would overflow int64")
            self._put(request.key, str(value).encode(), context)
        return pb.StoreAddResponse(value=value)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        if request.leaving:  # SIGTERM: its stage moves to a spare, then it exits
            known = request.worker_id in self.c.workers
            return pb.HeartbeatResponse(known=known, may_exit=leave(self.c, request.worker_id))
        with self.c.lock:
            w = self.c.workers.get(request.worker_id)
            if w is None:
                return pb.HeartbeatResponse(known=False)
            w.status = request.status
            w.last_seen = time.monotonic()
            self.c.relink(w)
        return pb.HeartbeatResponse(known=True)
