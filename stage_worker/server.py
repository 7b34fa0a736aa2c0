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

import datetime
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
import torch.distributed as dist
from prometheus_client import CollectorRegistry

from pipeline_core import GenStage, ModelSource, ReadStats, RequestError
from pipeline_core.cost import device_flops, device_name
from pipeline_core.detokenize import Detokenizer
from pipeline_core.engine import EngineLimits, GenerationEngine, serve_generation
from pipeline_core.microbatch import check_chunks
from pipeline_core.plan import Plan, unit_seconds
from pipeline_core.ring import Ring
from pipeline_core.runtime import DRIVER, Driver, RankMap, make_mesh, serve_stage
from pipeline_core.source import hf_tokenizer
from pipeline_core.stage import build_stage
from pipeserve import rpc
from pipeserve.observe import REQUEST_ID, WorkerCollector, new_request_id, serve_metrics
from pipeserve.v1 import pipeserve_pb2 as pb
from pipeserve.v1 import pipeserve_pb2_grpc as pbg
from stage_worker.lifecycle import REGISTERED, heartbeat_until, leave
from stage_worker.rendezvous import CoordinatorStore

__all__ = ["Worker", "serve"]

log = logging.getLogger(__name__)

SERVICE = "pipeserve.v1.StageWorker"
TIMEOUT_S = float(os.environ.get("PIPESERVE_DATAPLANE_TIMEOUT", "60"))
"""Data-plane (gloo/NCCL) timeout: a peer stuck this long fails the operation."""
FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
    "timeout": pb.FINISH_REASON_TIMEOUT,
}


class _Job:
    """One assignment: the stage, its ring, and (stage 0) the scheduler."""

    def __init__(
        self,
        req: pb.AssignRequest,
        device: str,
        limits: EngineLimits,
        on_ready: Any,
        registry: Any = None,
        metadata: Any = None,
    ) -> None:
        self.req = req
        self.registry, self.metadata = registry, metadata
        self.limits = limits
        self.on_ready = on_ready
        self.device = req.device or device
        self.plan = Plan.from_json(req.plan_json)
        self.stats = ReadStats()
        self.bytes_total = self.plan.stages[req.stage].nbytes
        self.state = "loading"
        self.error = ""
        self.stage: Any = None  # GenStage (generate) or Stage (forward)
        self.engine: GenerationEngine | None = None
        self.driver: Driver | None = None
        self.ring: Ring | None = None
        self.forward_lock = threading.Lock()
        self.tokenizer: Any = None
        self.thread = threading.Thread(target=self._run, name="stage-job", daemon=True)
        self.done = threading.Event()

    def _store(self) -> dist.Store:
        if self.req.rendezvous:  # a TCPStore somewhere
            host, port = self.req.rendezvous.rsplit(":", 1)
            timeout = datetime.timedelta(seconds=TIMEOUT_S)
            store: dist.Store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
            return dist.PrefixStore(f"{self.req.model}/{self.req.epoch}", store)
        # the coordinator's Registry store (default)
        store = CoordinatorStore(self.registry, self.metadata, TIMEOUT_S)
        return store.prefixed(f"{self.req.model}/{self.req.epoch}")

    def _run(self) -> None:
        try:
            if self.req.mode == "forward":
                self._run_forward()
            else:
                self._run_generate()
        except Exception as e:  # reported through Status and health
            log.exception("stage job failed")
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
        finally:
            self.done.set()

    def _run_forward(self) -> None:
        """Traced stage of any model; the last stage hosts the driver (fill-drain)."""
        req, n = self.req, self.req.world_size
        self.stage = build_stage(self.plan, req.stage, self.device, stats=self.stats)
        self.state = "joining"
        ranks = RankMap(n, driver_hosts_last=True)
        if req.stage == n - 1:
            mesh = make_mesh(self._store(), ranks, DRIVER, self.device, TIMEOUT_S)
            self.driver = Driver(mesh, self.stage.args, self.stage.outputs, hosted=self.stage)
            self.state = "ready"
            self.on_ready()
        else:
            mesh = make_mesh(self._store(), ranks, req.stage, self.device, TIMEOUT_S)
            self.state = "ready"
            self.on_ready()
            serve_stage(self.stage, mesh)  # until the driver sends STOP

    def forward(self, inputs: dict[str, torch.Tensor], chunks: int) -> Any:
        assert self.driver is not None
        names = [s.name for s in self.plan.inputs]
        unknown = sorted(set(inputs) - set(names))
        missing = [n for n in self.driver.input_names if n not in inputs]
        if unknown or missing:
            raise ValueError(f"inputs {unknown or missing} do not match the model's {names}")
        for spec in self.plan.inputs:
            if spec.name in inputs:
                spec.check(inputs[spec.name])
        mixed = self.plan.rows_mixed
        chunks = chunks or (1 if mixed else self.req.world_size)
        check_chunks(chunks, mixed)
        with self.forward_lock:  # one fill-drain pass at a time
            return self.driver.run(inputs, chunks)

    def _run_generate(self) -> None:
        req = self.req
        self.stage = GenStage(self.plan, req.stage, self.device, stats=self.stats)
        self.state = "joining"
        ring = Ring(self._store(), req.stage, req.world_size, self.device, TIMEOUT_S)
        self.ring = ring
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

    def status(self) -> dict[str, Any]:
        kv = {}
        if isinstance(self.stage, GenStage) and self.state == "ready":
            kv = self.stage.cache_stats()
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

    def metrics(self) -> dict[str, Any] | None:
        st = self.stage
        if not isinstance(st, GenStage):
            return None
        kv = st.cache_stats()
        return {
            "model": self.req.model,
            "stage": self.req.stage,
            "queue": self.engine.queue_depth if self.engine is not None else 0,
            "sequences": kv["sequences"],
            "kv": kv["bytes"],
            "kv_tokens": kv["tokens"],
            "compute": st.busy_s,
            "wait": st.wait_s,
            "send": st.send_s,
            "steps": st.steps,
            "bytes_sent": self.ring.bytes_sent if self.ring is not None else 0,
        }

    def abandon(self) -> None:
        """Drop the stage at once (a peer is gone): fail this stage's requests, send nothing.
        Threads blocked on the dead data plane end at its timeout."""
        if self.engine is not None:
            self.engine.abandon("the pipeline lost a worker; the coordinator replays requests")
        self.stage = self.engine = self.driver = None

    def release(self) -> None:
        if self.engine is not None:
            self.engine.close()  # STOP goes round the ring; other stages' loops end
        if self.driver is not None:
            self.driver.stop()  # the forward stages' loops end
        self.done.wait(timeout=30)
        self.stage = self.engine = self.driver = None


class Worker(pbg.StageWorkerServicer):
    def __init__(
        self, device: str, health: rpc.Health, counter: rpc.ByteCounter, limits: EngineLimits
    ) -> None:
        self.device = device
        self.health = health
        self.counter = counter
        self.limits = limits
        self.registry: Any = None  # the coordinator's Registry stub (rendezvous store)
        self.metadata: Any = None
        self.worker_id = ""
        self.job: _Job | None = None
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
                job = _Job(
                    request,
                    self.device,
                    self.limits,
                    lambda: self._set_health(True),
                    self.registry,
                    self.metadata,
                )
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
        tok = job.tokenizer
        try:
            params = rpc.sampling_from_proto(request)
            if request.HasField("text"):
                if tok is None:
                    raise ValueError("the model has no tokenizer; send token_ids instead of text")
                _check_text_size(request.text, job.engine)  # before the tokenizer sees it
                prompt = tok(request.text)["input_ids"]
            else:
                prompt = list(request.token_ids.ids)
            # a replay after a lost worker continues after what was streamed
            handle = job.engine.submit(prompt, params, resume=list(request.resume_token_ids))
        except Exception as e:
            rpc.abort_for(context, e)
        context.add_callback(handle.cancel)  # client gone / deadline: free the KV everywhere
        log.info("request %d admitted: %d prompt tokens", handle.id, len(prompt))
        detok = Detokenizer(tok) if tok is not None else None
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


BYTES_PER_TOKEN = 32
"""A text prompt may have this many UTF-8 bytes per token the model could take: far more
than any tokenizer's tokens hold on average, and it bounds the tokenizer's time and memory."""


def _check_text_size(text: str, engine: GenerationEngine) -> None:
    """Refuse a text prompt too long for the model before it is tokenized (a 20 MB text took
    30 s and 2.6 GB to tokenize just to be refused)."""
    tokens = min(engine.context_limit, engine.limits.max_tokens)
    limit = max(4096, int(tokens) * BYTES_PER_TOKEN)
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise RequestError(
            f"the text prompt is {size} bytes; this model takes at most {limit} "
            f"({BYTES_PER_TOKEN} per token of its {int(tokens)}-token limit): shorten it"
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
    except (ValueError, TypeError) as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except RuntimeError as e:  # a stage's forward raised on this input: it failed alone
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the model rejected the input: {e}")
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
) -> None:
    """Run a worker until ``stop`` is set (or forever): serve, register, heartbeat.

    ``speed_gflops`` (0: measured now, a matmul on ``device``) and ``memory_bytes`` (0: the
    device's total) are what the planner gives this worker's stage by; ``worker_id`` is the id
    asked for (e.g. the pod name).  ``leave_on_stop`` (SIGTERM): first move the stage to a
    spare (``lifecycle.leave``), then stop.
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
    worker = Worker(device, health, counter, limits)
    pbg.add_StageWorkerServicer_to_server(worker, server)
    registry = CollectorRegistry()
    registry.register(WorkerCollector(lambda: worker.job.metrics() if worker.job else None))
    serve_metrics(registry, metrics_port, host)
    server.start()
    health.set(REGISTERED, False)
    health_server = (
        rpc.serve_health_only(health, rpc.host_port(host, health_port)) if health_port else None
    )
    token = os.environ.get("PIPESERVE_WORKER_TOKEN", "")
    md = (("authorization", f"Bearer {token}"),) if token else None
    worker.metadata = md
    address = rpc.host_port(advertise_host or _advertised(host), port)
    stub = pbg.RegistryStub(rpc.channel(coordinator))
    worker.registry = stub
    stop = stop or threading.Event()
    log.info("worker serving on %s, coordinator %s", address, coordinator)
    print(
        f"worker listening on {address} (device {device}, {speed_gflops:.0f} GFLOP/s)", flush=True
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
