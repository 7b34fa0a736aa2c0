"""A worker's life with its coordinator: register (under ``--worker-id`` if given), heartbeat
until stopped, and, on SIGTERM, leave: the coordinator moves its stage to an idle spare
(in-flight streams are replayed there, none is lost) and says when it may exit.

Health: ``REGISTERED`` is SERVING while the coordinator knows this worker (readiness: alive
and registered, idle spares included); ``pipeserve.v1.StageWorker`` is SERVING while a stage
is loaded and joined.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import grpc

from pipeserve.v1 import pipeserve_pb2 as pb

__all__ = ["DRAIN_TIMEOUT_S", "REGISTERED", "heartbeat_until", "leave"]

log = logging.getLogger(__name__)

REGISTERED = "pipeserve.worker.registered"
DRAIN_TIMEOUT_S = 20.0
"""Leaving: the longest wait for the stage to move before exiting anyway (the manifests'
``terminationGracePeriodSeconds`` exceed it)."""


def heartbeat_until(
    worker: Any, registry: Any, register: pb.RegisterRequest, md: Any, stop: threading.Event
) -> None:
    """Register, then heartbeat every interval the coordinator asks for, until ``stop``;
    register again whenever the coordinator no longer knows this worker."""
    interval = 1.0
    last = pb.WorkerStatus(state="idle")
    while not stop.is_set():
        try:
            if not worker.worker_id:
                r = registry.Register(register, timeout=10, metadata=md)
                worker.worker_id = r.worker_id
                interval = max(0.05, r.heartbeat_interval_ms / 1000)
                log.info("registered as %s", r.worker_id)
            try:
                status = last = worker.status_proto()
            except Exception:  # figures read while the stage runs: never skip a heartbeat
                log.warning("status figures unavailable; sending the last ones", exc_info=True)
                status = last
            hb = registry.Heartbeat(
                pb.HeartbeatRequest(worker_id=worker.worker_id, status=status),
                timeout=10,
                metadata=md,
            )
            worker.health.set(REGISTERED, hb.known)
            if not hb.known:
                worker.worker_id = ""
                continue
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                log.error("the coordinator refused this worker: %s", e.details())
            else:
                log.warning("coordinator unreachable: %s", e.code())  # it logs its address
        except Exception:  # a bug in reporting must not take the worker down
            log.exception("heartbeat failed")
        stop.wait(interval)


def leave(worker: Any, registry: Any, md: Any, timeout: float = DRAIN_TIMEOUT_S) -> bool:
    """Tell the coordinator this worker is going and wait until it may exit (its stage moved
    to a spare, or given up when there is none); True if it said so within ``timeout``."""
    worker.health.set(REGISTERED, False)  # not Ready: no new traffic is routed here
    if not worker.worker_id:
        return True
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            status = worker.status_proto()
        except Exception:  # figures read while the stage runs: leaving needs none of them
            status = pb.WorkerStatus(worker_id=worker.worker_id)
        try:
            r = registry.Heartbeat(
                pb.HeartbeatRequest(worker_id=worker.worker_id, status=status, leaving=True),
                timeout=5,
                metadata=md,
            )
        except grpc.RpcError as e:  # no coordinator: nothing can take the stage
            log.warning("leaving: coordinator unreachable (%s); exiting", e.code())
            return False
        if not r.known or r.may_exit:
            log.info("worker %s left after %.1f s", worker.worker_id, time.monotonic() - t0)
            return True
        time.sleep(0.2)
    log.warning(
        "worker %s: its stage did not move within %.0f s; exiting", worker.worker_id, timeout
    )
    return False
