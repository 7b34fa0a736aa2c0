"""The stage worker: a gRPC server around one generation stage of ``pipeline_core``.

It registers with the coordinator and heartbeats; on ``Assign`` it loads only its stage's
tensors (in the background, reporting bytes loaded), joins the data-plane ring through the
rendezvous store the coordinator hosts, and serves.  Stage 0 also runs the scheduler and
answers ``Generate`` (request admission + token stream); activations never touch gRPC.
Health: ``pipeserve.v1.StageWorker`` is NOT_SERVING until the stage is ready (serving a
stage); ``pipeserve.worker.registered`` while the coordinator knows the worker (readiness, see
``lifecycle``); "" is SERVING while the process runs (liveness).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import torch
from prometheus_client import CollectorRegistry

from pipeline_core import ModelSource
from pipeline_core.cost import device_flops, device_name
from pipeline_core.engine import EngineLimits
from pipeline_core.plan import unit_seconds
from pipeline_core.stage_options import StageOptions
from pipeserve import rpc
from pipeserve.observe import REQUEST_ID, WorkerCollector, new_request_id, serve_metrics
from pipeserve.v1 import pipeserve_pb2 as pb
from pipeserve.v1 import pipeserve_pb2_grpc as pbg
from stage_worker.job import DATAPLANE_TIMEOUT_S, StageJob
from stage_worker.lifecycle import REGISTERED, heartbeat_until, leave

__all__ = ["Worker", "serve"]

log = logging.getLogger(__name__)

SERVICE = "pipeserve.v1.StageWorker"
FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
    "timeout": pb.FINISH_REASON_TIMEOUT,
}


class Worker(pbg.StageWorkerServicer):
    """The ``StageWorker`` servicer: a few lines per call over the assigned ``StageJob``."""

    def __init__(
        self,
        device: str,
        health: rpc.Health,
        counter: rpc.ByteCounter,
        limits: EngineLimits,
        dataplane_timeout: float = DATAPLANE_TIMEOUT_S,
        options: StageOptions | None = None,
    ) -> None:
        self.device = device
        self.dataplane_timeout = dataplane_timeout
        self.options = options or StageOptions()
        self.health = health
        self.counter = counter
        self.limits = limits
        self.registry: Any = None  # the coordinator's Registry stub (rendezvous store)
        self.metadata: Any = None
        self.worker_id = ""
        self.job: StageJob | None = None
        self.lock = threading.Lock()
        self._set_health(False)

    def _set_health(self, serving: bool) -> None:
        self.health.set(SERVICE, serving)  # readiness: the stage is loaded and joined
        self.health.set("", True)  # liveness: the process answers

    def status_proto(self) -> pb.WorkerStatus:
        job = self.job
        if job is None:
            return pb.WorkerStatus(
                worker_id=self.worker_id, state="idle", rpc_bytes=self.counter.total
            )
        st = job.status()
        self._set_health(st["state"] == "ready")
        return pb.WorkerStatus(worker_id=self.worker_id, rpc_bytes=self.counter.total, **st)

    # -------------------------------------------------------------- StageWorker

    def Assign(self, request: pb.AssignRequest, context: grpc.ServicerContext) -> Any:
        with self.lock:
            if self.job is not None and self.job.state != "failed":
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"worker already serves stage {self.job.req.stage} of "
                    f"{self.job.req.model!r}; release it first",
                )
            try:
                job = StageJob(
                    request,
                    self.device,
                    self.limits,
                    lambda: self._set_health(True),
                    self.registry,
                    self.metadata,
                    self.dataplane_timeout,
                    self.options,
                )
            except Exception as e:
                rpc.abort_for(context, e)
            self.job = job
            job.thread.start()
        return pb.AssignResponse()

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> Any:
        return self.status_proto()

    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> Any:
        with self.lock:
            job, self.job = self.job, None
        self._set_health(False)
        if job is not None:
            job.abandon() if request.abandon else job.release()
        return pb.ReleaseResponse()

    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> Any:
        return _forward(self, request, context)

    def Profile(self, request: pb.ProfileRequest, context: grpc.ServicerContext) -> Any:
        """Unit times of a checkpoint's model on this device (planning by time)."""
        if self.job is not None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"worker {self.worker_id} serves a stage; profile on an idle worker",
            )
        workload = rpc.workload_from_proto(request.workload, self.device, torch.get_num_threads())
        try:
            with self.lock:
                seconds = unit_seconds(
                    ModelSource(checkpoint=request.checkpoint), request.dtype or None, workload
                )
        except Exception as e:
            rpc.abort_for(context, e)
            raise
        return pb.ProfileResponse(unit_seconds=seconds, device_name=device_name(self.device))

    def Timeline(self, request: pb.TimelineRequest, context: grpc.ServicerContext) -> Any:
        job = self.job
        timeline = getattr(job.stage, "timeline", None) if job is not None else None
        if timeline is None:
            return pb.TimelineResponse()
        since = time.time() - (request.seconds or 5.0)
        return pb.TimelineResponse(
            events=[
                pb.TimelineEvent(
                    stage=job.req.stage,
                    kind=e.kind,
                    group=e.group,
                    rows=e.rows,
                    start=e.start,
                    end=e.end,
                )
                for e in timeline.since(since)
            ]
        )

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        job = self.job
        if job is None or job.engine is None or job.state != "ready":
            context.abort(  # forward-mode models have no scheduler
                grpc.StatusCode.FAILED_PRECONDITION,
                "this worker is not a ready stage 0; ask the coordinator, which routes requests",
            )
        assert job is not None and job.engine is not None
        REQUEST_ID.set(new_request_id(context.invocation_metadata()))
        try:
            handle, detok = job.submit(request)
        except Exception as e:
            rpc.abort_for(context, e)
        context.add_callback(handle.cancel)  # client gone / deadline: free the KV everywhere
        sent = 0
        for _ in handle:
            tokens = handle.tokens[sent:]
            if not tokens:
                continue
            sent += len(tokens)
            text = detok.push(tokens) if detok is not None else ""
            yield pb.GenerateResponse(token_ids=tokens, text=text)
        res = handle.result()
        log.info(
            "request %d finished: %s, %d tokens", handle.id, res.finish_reason, len(res.tokens)
        )
        if res.error is not None:
            context.abort(grpc.StatusCode.INTERNAL, res.error)
        if res.finish_reason == "cancelled" and not context.is_active():
            return
        rest = res.tokens[sent:]
        yield pb.GenerateResponse(
            token_ids=rest,
            text=detok.push(rest) + detok.flush() if detok is not None else "",
            finish_reason=FINISH.get(res.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
            usage=pb.Usage(
                prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens
            ),
        )


def _forward(worker: Worker, request: pb.ForwardRequest, context: grpc.ServicerContext) -> Any:
    job = worker.job
    if job is None or job.driver is None or job.state != "ready":
        context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            "this worker is not the ready last stage of a forward model; ask the coordinator",
        )
    assert job is not None
    try:
        inputs = {t.name: rpc.tensor_from_proto(t) for t in request.inputs}
        out = job.forward(inputs, request.chunks)
    except Exception as e:  # bad inputs, or the model rejected them: INVALID_ARGUMENT
        rpc.abort_for(context, e)
    outs = out if isinstance(out, tuple | list) else [out]
    return pb.ForwardResponse(
        outputs=[rpc.tensor_to_proto(f"output_{i}", t) for i, t in enumerate(outs)]
    )


def _advertised(host: str) -> str:
    """The host the coordinator should call: the bound address when it is a specific one
    (``--host 127.0.0.1`` is reachable only there), else this machine's name."""
    return host if host not in ("", "0.0.0.0", "::", "[::]") else socket.gethostname()


def _memory_bytes(device: str) -> int:
    """What the device holds: the GPU's memory, or this host's RAM capped by the container's
    cgroup limit (a pod sees the node's RAM in ``/proc`` but may use only its limit)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    ram = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return min(ram, _cgroup_limit() or ram)


def _cgroup_limit() -> int:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return 0


def serve(
    coordinator: str,
    *,
    host: str = "0.0.0.0",
    port: int = 0,
    device: str = "cpu",
    advertise_host: str | None = None,
    limits: EngineLimits | None = None,
    metrics_port: int = 0,
    health_port: int = 0,
    stop: threading.Event | None = None,
    speed_gflops: float = 0.0,
    memory_bytes: int = 0,
    worker_id: str = "",
    leave_on_stop: bool = False,
    worker_token: str = "",
    dataplane_timeout: float = DATAPLANE_TIMEOUT_S,
    options: StageOptions | None = None,
) -> None:
    """Run a worker until ``stop`` is set (or forever): serve, register, heartbeat.

    ``speed_gflops`` (0: measured now, a matmul on ``device``) and ``memory_bytes`` (0: the
    device's total) are what the planner gives this worker's stage by; ``worker_id`` is the id
    asked for (e.g. the pod name).  ``leave_on_stop`` (SIGTERM): first move the stage to a
    spare (``lifecycle.leave``), then stop.  ``worker_token``: presented to the coordinator
    when it requires one; ``dataplane_timeout``: seconds before a stuck gloo/NCCL operation
    fails; ``options``: step timing and CUDA IPC of the stage (the command line reads all three
    from the environment).
    """
    limits = limits or EngineLimits()
    if speed_gflops <= 0:
        speed_gflops = device_flops(device, torch.float32, torch.get_num_threads()) / 1e9
    memory_bytes = memory_bytes or _memory_bytes(device)
    # only the coordinator may call StageWorker: it gets this secret when the worker registers
    control_token = secrets.token_urlsafe(32)
    auth = rpc.BearerAuth(SERVICE, control_token, "StageWorker calls (the coordinator's only)")
    server, port, health, counter = rpc.make_server(
        rpc.host_port(host, port), [SERVICE], interceptors=[auth]
    )
    worker = Worker(device, health, counter, limits, dataplane_timeout, options)
    pbg.add_StageWorkerServicer_to_server(worker, server)
    registry = CollectorRegistry()
    registry.register(WorkerCollector(lambda: worker.job.metrics() if worker.job else None))
    serve_metrics(registry, metrics_port, host)
    server.start()
    health.set(REGISTERED, False)
    health_server = (
        rpc.serve_health_only(health, rpc.host_port(host, health_port)) if health_port else None
    )
    md = (("authorization", f"Bearer {worker_token}"),) if worker_token else None
    worker.metadata = md
    address = rpc.host_port(advertise_host or _advertised(host), port)
    stub = pbg.RegistryStub(rpc.channel(coordinator))
    worker.registry = stub
    stop = stop or threading.Event()
    log.info(
        "worker listening on %s (device %s, %.0f GFLOP/s), coordinator %s",
        address,
        device,
        speed_gflops,
        coordinator,
    )
    register = pb.RegisterRequest(
        address=address,
        device=device,
        memory_bytes=memory_bytes,
        hostname=socket.gethostname(),
        speed_gflops=speed_gflops,
        device_name=device_name(device),
        kv_tokens=limits.max_tokens,
        worker_id=worker_id,
        control_token=control_token,
    )
    heartbeat_until(worker, stub, register, md, stop)
    if leave_on_stop:
        leave(worker, stub, md)
    server.stop(grace=2).wait()
    if health_server is not None:
        health_server.stop(grace=1).wait()
