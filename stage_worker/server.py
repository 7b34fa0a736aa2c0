"""The stage worker: a gRPC server around one generation stage of ``pipeline_core``.

It registers with the coordinator and heartbeats; on ``Assign`` it loads only its stage's
tensors (in the background, reporting bytes loaded), joins the data-plane ring through the
rendezvous store the coordinator hosts, and serves.  Stage 0 also runs the scheduler and
answers ``Generate`` (request admission + token stream); activations never touch gRPC.
Health: ``pipeserve.v1.StageWorker`` (and "") are NOT_SERVING until the stage is ready.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import torch
import torch.distributed as dist

from pipeline_core import GenStage, ReadStats
from pipeline_core.engine import EngineLimits, GenerationEngine, serve_generation
from pipeline_core.plan import Plan
from pipeline_core.ring import Ring
from pipeline_core.source import hf_tokenizer
from pipeserve import rpc
from pipeserve.v1 import pipeserve_pb2 as pb
from pipeserve.v1 import pipeserve_pb2_grpc as pbg

__all__ = ["Worker", "serve"]

log = logging.getLogger(__name__)

SERVICE = "pipeserve.v1.StageWorker"
FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
    "timeout": pb.FINISH_REASON_TIMEOUT,
}


class _Job:
    """One assignment: the stage, its ring, and (stage 0) the scheduler."""

    def __init__(
        self, req: pb.AssignRequest, device: str, limits: EngineLimits, on_ready: Any
    ) -> None:
        self.req = req
        self.limits = limits
        self.on_ready = on_ready
        self.device = req.device or device
        self.plan = Plan.from_json(req.plan_json)
        self.stats = ReadStats()
        self.bytes_total = self.plan.stages[req.stage].nbytes
        self.state = "loading"
        self.error = ""
        self.stage: GenStage | None = None
        self.engine: GenerationEngine | None = None
        self.tokenizer: Any = None
        self.thread = threading.Thread(target=self._run, name="stage-job", daemon=True)
        self.done = threading.Event()

    def _run(self) -> None:
        req = self.req
        try:
            self.stage = GenStage(self.plan, req.stage, self.device, stats=self.stats)
            self.state = "joining"
            host, port = req.rendezvous.rsplit(":", 1)
            store = dist.TCPStore(
                host, int(port), is_master=False, timeout=datetime.timedelta(seconds=300)
            )
            scoped = dist.PrefixStore(f"{req.model}/{req.epoch}", store)
            ring = Ring(scoped, req.stage, req.world_size, self.device)
            if req.stage == 0:
                ring_ = ring if req.world_size > 1 else None
                self.engine = GenerationEngine(self.stage, ring_, self.limits)
                self.tokenizer = hf_tokenizer(self.plan.source.checkpoint)
                self.state = "ready"
                self.on_ready()
            else:
                self.state = "ready"
                self.on_ready()
                serve_generation(self.stage, ring)  # until stage 0 sends STOP
        except Exception as e:
            log.exception("stage job failed")
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
        finally:
            self.done.set()

    def status(self) -> dict[str, Any]:
        kv = self.stage.cache_stats() if self.stage is not None and self.state == "ready" else {}
        return {
            "state": self.state,
            "model": self.req.model,
            "stage": self.req.stage,
            "bytes_loaded": self.stats.total_bytes,
            "bytes_total": self.bytes_total,
            "error": self.error,
            "epoch": self.req.epoch,
            "kv_sequences": kv.get("sequences", 0),
            "kv_bytes": kv.get("bytes", 0),
        }

    def release(self) -> None:
        if self.engine is not None:
            self.engine.close()  # STOP goes round the ring; other stages' loops end
        self.done.wait(timeout=30 if self.req.stage else 0)
        self.stage = None
        self.engine = None


class Worker(pbg.StageWorkerServicer):
    def __init__(
        self, device: str, health: rpc.Health, counter: rpc.ByteCounter, limits: EngineLimits
    ) -> None:
        self.device = device
        self.health = health
        self.counter = counter
        self.limits = limits
        self.worker_id = ""
        self.job: _Job | None = None
        self.lock = threading.Lock()
        self._set_health(False)

    def _set_health(self, serving: bool) -> None:
        self.health.set(SERVICE, serving)
        self.health.set("", serving)

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
                job = _Job(request, self.device, self.limits, lambda: self._set_health(True))
            except Exception as e:
                rpc.abort_for(context, e)
            if not 0 <= request.stage < job.plan.num_stages:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stage index out of range")
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
            job.release()
        return pb.ReleaseResponse()

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        job = self.job
        if job is None or job.engine is None or job.state != "ready":
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this worker is not a ready stage 0; ask the coordinator, which routes requests",
            )
        assert job is not None and job.engine is not None
        tok = job.tokenizer
        try:
            params = rpc.sampling_from_proto(request)
            if request.HasField("text"):
                if tok is None:
                    raise ValueError("the model has no tokenizer; send token_ids instead of text")
                prompt = tok(request.text)["input_ids"]
            else:
                prompt = list(request.token_ids.ids)
            handle = job.engine.submit(prompt, params)
        except Exception as e:
            rpc.abort_for(context, e)
        context.add_callback(handle.cancel)  # client gone / deadline: free the KV everywhere
        sent_text = ""
        sent = 0
        for _ in handle:
            tokens = handle.tokens[sent:]
            if not tokens:
                continue
            sent += len(tokens)
            text = ""
            if tok is not None:
                full = tok.decode(handle.tokens[:sent], skip_special_tokens=True)
                text, sent_text = full[len(sent_text) :], full
            yield pb.GenerateResponse(token_ids=tokens, text=text)
        res = handle.result()
        if res.error is not None:
            context.abort(grpc.StatusCode.INTERNAL, res.error)
        if res.finish_reason == "cancelled" and not context.is_active():
            return
        yield pb.GenerateResponse(
            token_ids=res.tokens[sent:],
            finish_reason=FINISH.get(res.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
            usage=pb.Usage(
                prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens
            ),
        )


def _memory_bytes(device: str) -> int:
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def serve(
    coordinator: str,
    *,
    host: str = "0.0.0.0",
    port: int = 0,
    device: str = "cpu",
    advertise_host: str | None = None,
    limits: EngineLimits | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run a worker until ``stop`` is set (or forever): serve, register, heartbeat."""
    limits = limits or EngineLimits()
    server, port, health, counter = rpc.make_server(f"{host}:{port}", [SERVICE])
    worker = Worker(device, health, counter, limits)
    pbg.add_StageWorkerServicer_to_server(worker, server)
    server.start()
    address = f"{advertise_host or socket.gethostname()}:{port}"
    registry = pbg.RegistryStub(rpc.channel(coordinator))
    stop = stop or threading.Event()
    interval = 1.0
    log.info("worker serving on %s, coordinator %s", address, coordinator)
    print(f"worker listening on {address} (device {device})", flush=True)
    while not stop.is_set():
        try:
            if not worker.worker_id:
                r = registry.Register(
                    pb.RegisterRequest(
                        address=address,
                        device=device,
                        memory_bytes=_memory_bytes(device),
                        hostname=socket.gethostname(),
                    ),
                    timeout=10,
                )
                worker.worker_id = r.worker_id
                interval = max(0.05, r.heartbeat_interval_ms / 1000)
                print(f"registered as {r.worker_id}", flush=True)
            hb = registry.Heartbeat(
                pb.HeartbeatRequest(worker_id=worker.worker_id, status=worker.status_proto()),
                timeout=10,
            )
            if not hb.known:
                worker.worker_id = ""
                continue
        except grpc.RpcError as e:
            log.warning("coordinator %s unreachable: %s", coordinator, e.code())
        stop.wait(interval)
    server.stop(grace=2)
