"""The coordinator: registry of workers, planner, assignment, client and admin APIs.

It plans models on the meta device (never holding weights), assigns one stage per idle worker
with a group epoch -- the data plane's rendezvous is a key-value store served on the
coordinator's own gRPC port (bound to its address, under its TLS and worker token) -- and
relays client requests to the stage-0 worker, whose scheduler streams tokens back.  It never
holds weights or activations: only token ids and text pass through it.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from pipeline_core import ModelSource, Plan, Policy, RequestError, Workload, make_plan
from pipeline_core.source import dtype_name, resolve_dtype
from pipeserve import rpc
from pipeserve.observe import REQUEST_ID, CoordinatorMetrics, new_request_id, serve_metrics
from pipeserve.v1 import pipeserve_pb2 as pb
from pipeserve.v1 import pipeserve_pb2_grpc as pbg

from .recovery import LOAD_TIMEOUT_S, Recovery

__all__ = ["CallError", "Coordinator", "serve"]

log = logging.getLogger(__name__)

HEARTBEAT_MS = 500
LOST_AFTER_S = 5.0
"""A worker whose heartbeats stop this long is lost (``--worker-timeout``)."""
STOP_GRACE_S = 5.0
"""On SIGTERM: seconds calls in flight may finish (the manifests' terminationGracePeriodSeconds
exceed it)."""
RECOVERY_TIMEOUT_S = 300.0
PROFILE_TIMEOUT_S = 300.0
"""How long a worker may take to profile a model's unit kinds before planning by FLOPs."""
SERVICES = ["pipeserve.v1.Inference", "pipeserve.v1.Admin", "pipeserve.v1.Registry"]
_LOST = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}
"""Upstream codes that may mean the pipeline lost a worker (the relay waits for recovery
and replays); any other code is the request's own answer and goes to the client at once."""


class CallError(Exception):
    """A request error with its gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class WorkerRecord:
    id: str
    address: str
    device: str
    memory: int
    stub: Any
    status: pb.WorkerStatus = field(default_factory=pb.WorkerStatus)
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
    def state(self) -> str:
        if time.monotonic() - self.last_seen > self.lost_after:
            return "lost"
        if self.draining:
            return "draining"
        return self.status.state or "idle"


@dataclass
class ModelRecord:
    name: str
    checkpoint: str
    plan: Plan
    workers: list[str]
    epoch: int
    mode: str = "generate"
    state: int = pb.MODEL_STATE_LOADING
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

    def info(self) -> pb.ModelInfo:
        inputs = []
        if self.mode == "forward":
            for spec in self.plan.inputs:
                shape = [-1 if d in spec.dynamic else n for d, n in enumerate(spec.shape)]
                inputs.append(pb.Tensor(name=spec.name, dtype=spec.dtype, shape=shape))
        return pb.ModelInfo(
            name=self.name,
            state=self.state,
            checkpoint=self.checkpoint,
            num_stages=self.plan.num_stages,
            capabilities=[self.mode],
            error=self.error,
            epoch=self.epoch,
            inputs=inputs,
            dtype=self.plan.dtype,
        )


class StateStore:
    """The coordinator's deployments in SQLite (``--state-db``), so a restarted coordinator
    comes back with its models: workers keep serving, re-register, and are linked back by
    (model, stage, epoch)."""

    def __init__(self, path: str) -> None:
        import sqlite3

        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS models (name TEXT PRIMARY KEY, checkpoint TEXT, "
            "plan TEXT, mode TEXT, device TEXT, epoch INTEGER)"
        )
        self._lock = threading.Lock()

    def save(self, m: ModelRecord) -> None:
        with self._lock:
            self.db.execute(
                "INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?)",
                (m.name, m.checkpoint, m.plan.dumps(), m.mode, m.device, m.epoch),
            )

    def delete(self, name: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM models WHERE name = ?", (name,))

    def load(self) -> list[ModelRecord]:
        with self._lock:
            rows = self.db.execute("SELECT * FROM models").fetchall()
        out = []
        for name, checkpoint, plan, mode, device, epoch in rows:
            p = Plan.from_json(plan)
            m = ModelRecord(name, checkpoint, p, [""] * p.num_stages, epoch, mode)
            m.device = device
            m.error = "restoring: waiting for its workers to re-register"
            out.append(m)
        return out


def policy_from_proto(p: pb.SplitPolicy) -> Policy:
    """The split policy; ``balanced`` (by time) when none is set."""
    kind = p.WhichOneof("kind")
    if kind == "threshold_bytes":
        return Policy.threshold(p.threshold_bytes)
    if kind == "manual":
        return Policy.manual(list(p.manual.split_at))
    if kind == "equal_size":
        return Policy.equal_size(p.equal_size)
    return Policy.balanced(p.balanced)


UNKNOWN_MEMORY = 2**62
"""A worker that reported no memory size is planned as if it had no limit."""
MAX_NAME = 128
"""Longest model name (names come back in every answer about the model)."""
MAX_PATH = 4096
SAME_SPEED = 0.15
"""Workers whose speed figures differ by less than this share count as equally fast: the
start-up matmul is noisy, and a 5% wobble must not move layers between identical workers."""


def relative_speeds(speeds: list[float]) -> list[float]:
    """Each worker's speed relative to the first, snapped to 1.0 within ``SAME_SPEED``."""
    ref = speeds[0] if speeds and speeds[0] > 0 else 0.0
    if ref <= 0 or any(s <= 0 for s in speeds):
        return [1.0] * len(speeds)
    out = []
    for s in speeds:
        r = s / ref
        out.append(1.0 if abs(r - 1.0) < SAME_SPEED else r)
    return out


@dataclass
class Placement:
    """A balanced plan's inputs from the idle workers: who, how fast, how big, unit times
    (the KV budget to reserve goes into the caller's workload)."""

    workers: list[WorkerRecord]
    policy: Policy
    unit_seconds: dict[str, float] | None
    times_from: str


class Coordinator(Recovery):
    """Cluster state and the gRPC servicers over it (recovery: :class:`Recovery`)."""

    def __init__(self, health: rpc.Health, registry: CollectorRegistry | None = None) -> None:
        self.health = health
        self.registry = registry or CollectorRegistry()
        self.metrics = CoordinatorMetrics(self.registry)
        self.registry.register(_ClusterCollector(self))
        self.model_roots: list[Path] = []
        self.lost_after = LOST_AFTER_S
        self.started = time.monotonic()
        self.instance = uuid.uuid4().hex[:4]
        self.client_token = os.environ.get("PIPESERVE_CLIENT_TOKEN", "")
        self.kv: dict[str, bytes] = {}
        """The data-plane rendezvous records (Registry.Store*; bounded in registry.py)."""
        self.kv_bytes = 0
        self.max_streams_per_client = 0
        """Generate calls one client address may have in flight, over every API (0: any)."""
        self.client_streams: Counter[str] = Counter()
        self.state: StateStore | None = None
        self.recoveries: list[dict[str, Any]] = []
        """Completed recoveries: model, lost workers, seconds from detection to ready."""
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.workers: dict[str, WorkerRecord] = {}
        self.models: dict[str, ModelRecord] = {}
        self._ids = itertools.count(1)
        self._epochs = itertools.count(1)

    # ------------------------------------------------------------------ helpers

    def authorize_client(self, context: grpc.ServicerContext) -> None:
        """Client calls (Inference, KServe inference) carry ``PIPESERVE_CLIENT_TOKEN`` when
        one is set."""
        if self.client_token:
            _check_token(context, self.client_token, "client calls", "PIPESERVE_CLIENT_TOKEN")

    def find(self, name: str, ready: bool = True) -> ModelRecord:
        """The model called ``name``; raises :class:`CallError` with the status to return."""
        with self.lock:
            m = self.models.get(name)
            known = sorted(self.models)
        if m is None:
            raise CallError(
                grpc.StatusCode.NOT_FOUND,
                f"no model {rpc.clip(name)} (loaded: {', '.join(known) or 'none'}); load it with "
                "`pipeserve admin load`",
            )
        if ready and m.state != pb.MODEL_STATE_READY:
            state = pb.ModelState.Name(m.state)
            raise CallError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {name!r} is not ready ({state}{': ' + m.error if m.error else ''})",
            )
        return m

    def idle(self) -> list[WorkerRecord]:
        """Workers that can take a stage, by registration (the caller holds ``lock``)."""
        return sorted(
            (w for w in self.workers.values() if w.state == "idle" and not w.model),
            key=lambda w: w.seq,
        )

    def model(self, name: str, context: grpc.ServicerContext, ready: bool = True) -> ModelRecord:
        try:
            return self.find(name, ready)
        except CallError as e:
            context.abort(e.code, e.message)
            raise

    def open_generate(
        self, request: pb.GenerateRequest, timeout: float | None, rid: str = ""
    ) -> Any:
        """Start a Generate call on the model's stage-0 worker (raises :class:`CallError`)."""
        m = self.models.get(request.model)
        if m is not None and m.waiting:
            raise CallError(grpc.StatusCode.UNAVAILABLE, m.waiting)
        if m is not None and m.recovering:
            raise CallError(
                grpc.StatusCode.UNAVAILABLE, f"model {m.name!r} is recovering from a lost worker"
            )
        m = self.find(request.model)
        w = self.workers.get(m.workers[0])
        if w is None or w.state == "lost":
            raise CallError(
                grpc.StatusCode.UNAVAILABLE,
                f"the stage-0 worker of {m.name!r} is gone; reload the model",
            )
        md = (("x-request-id", rid),) if rid else None
        return w.stub.Generate(request, timeout=timeout, metadata=md)

    def relay_generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext, method: str = "Generate"
    ) -> Iterator[pb.GenerateResponse]:
        """Relay a Generate call to the stage-0 worker.  If the pipeline loses a worker
        mid-stream, wait for it to be re-formed and replay the request with the tokens
        already streamed (``resume_token_ids``): the client sees one uninterrupted stream.
        ``max_streams_per_client`` bounds the calls one client address has in flight, whichever
        API (pipeserve.v1, KServe) they came by; an HTTP gateway is one client."""
        peer = context.peer().rsplit(":", 1)[0]  # the client's address, without its port
        with self.lock:
            if self.max_streams_per_client and (
                self.client_streams[peer] >= self.max_streams_per_client
            ):
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{rpc.clip(peer)} already has {self.client_streams[peer]} requests in "
                    "flight (the limit per client); wait for one to finish",
                )
            self.client_streams[peer] += 1
        try:
            yield from self._relay(request, context, method)
        finally:
            with self.lock:
                self.client_streams[peer] -= 1
                if not self.client_streams[peer]:
                    del self.client_streams[peer]  # bounded by the clients in flight

    def _relay(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext, method: str
    ) -> Iterator[pb.GenerateResponse]:
        rid = new_request_id(context.invocation_metadata())
        REQUEST_ID.set(rid)
        context.send_initial_metadata((("x-request-id", rid),))
        track = self.metrics.track(request.model, method)
        status = "OK"
        streamed: list[int] = []
        try:
            try:  # a bad request is refused now, never after waiting for a recovery
                rpc.check_generate(request)
                self.find(request.model, ready=False)
            except RequestError as e:
                status = "INVALID_ARGUMENT"
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except CallError as e:
                status = e.code.name
                context.abort(e.code, e.message)
            while True:
                req = pb.GenerateRequest()
                req.CopyFrom(request)
                resumed = len(streamed)
                if streamed:
                    req.resume_token_ids.extend(streamed)
                epoch = self.models[request.model].epoch if request.model in self.models else 0
                try:
                    call = self.open_generate(req, rpc.remaining(context), rid)
                except CallError as e:
                    if streamed and self.wait_recovered(request.model, epoch, context):
                        continue
                    status = e.code.name
                    context.abort(e.code, e.message)
                m = self.models.get(request.model)
                if m is not None:
                    m.calls.add(call)
                context.add_callback(call.cancel)  # client cancelled / deadline: upstream too
                try:
                    for r in call:
                        if r.finish_reason and resumed:  # usage of the whole request
                            r.usage.prompt_tokens -= resumed
                            r.usage.completion_tokens += resumed
                        streamed += r.token_ids
                        track.tokens(len(r.token_ids))
                        yield r
                    return
                except grpc.RpcError as e:
                    if not context.is_active():
                        return
                    if e.code() in _LOST and self.wait_recovered(request.model, epoch, context):
                        log.info("replaying after %d streamed tokens", len(streamed))
                        continue
                    code, details = e.code(), e.details() or ""
                    m = self.models.get(request.model)
                    if code in _LOST and m is not None and (m.waiting or m.recovering):
                        code = grpc.StatusCode.UNAVAILABLE  # not the relay's own cancel
                        details = m.waiting or f"model {m.name!r} is recovering: {m.error}"
                    status = code.name
                    context.abort(code, details)
                finally:
                    if m is not None:
                        m.calls.discard(call)
        except GeneratorExit:
            status = "CANCELLED"
            raise
        finally:
            if not context.is_active() and status == "OK":
                status = "CANCELLED"
            track.done(status)
            log.info("generate on %s: %s", request.model, status)

    def relink(self, w: WorkerRecord) -> None:
        """A worker that re-registered after a coordinator restart and still serves a stage
        of a restored model takes its place again (caller holds the lock)."""
        st = w.status
        m = self.models.get(st.model)
        if m is None or st.state != "ready" or st.epoch != m.epoch or w.model:
            return
        if m.recovering:
            # [Note: relink during a recovery] an attempt under way owns the model: it may
            # have dropped this epoch's other stages already (and wait for a spare), so the
            # ring is not whole.  The worker's stale stage is reclaimed and it serves as a
            # spare; only the attempt sets READY, after it re-formed the ring.
            return
        if not (0 <= st.stage < len(m.workers)) or m.workers[st.stage]:
            return
        m.workers[st.stage] = w.id
        w.model = m.name
        if all(m.workers):
            m.state, m.error = pb.MODEL_STATE_READY, ""
            self.health.set(f"pipeserve.model.{m.name}", True)
            self.changed.notify_all()
            log.warning("model %s restored (epoch %d)", m.name, m.epoch)

    def wait_recovered(self, name: str, epoch: int, context: grpc.ServicerContext) -> bool:
        """After an upstream failure: True once the model is ready again under a newer epoch
        (replay), False if the failure was not a lost worker or no spare can take over."""
        grace = time.monotonic() + self.lost_after + 2.0  # time for heartbeats to go missing
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        with self.changed:
            while context.is_active():
                m = self.models.get(name)
                if m is None:
                    return False
                if m.waiting:
                    return False  # no spare: fail fast (the caller aborts with UNAVAILABLE)
                if m.state == pb.MODEL_STATE_READY and m.epoch > epoch:
                    return True
                now = time.monotonic()
                if not m.recovering and m.epoch == epoch and now > grace:
                    return False
                if now > deadline:
                    return False
                self.changed.wait(0.2)
        return False

    def prune_store(self, name: str, keep_epoch: int = -1) -> None:
        """Drop the rendezvous keys of ``name``'s other epochs (workers key them
        ``model/epoch/...``): a re-formed or unloaded model's old keys are never read again."""
        keep = f"{name}/{keep_epoch}/"
        with self.lock:
            for k in [k for k in self.kv if k.startswith(f"{name}/") and not k.startswith(keep)]:
                self.kv_bytes -= len(self.kv.pop(k))

    def forward(self, request: pb.ForwardRequest, timeout: float | None) -> pb.ForwardResponse:
        """Run a forward-mode model through its last-stage worker (which hosts the driver)."""
        m = self.find(request.model)
        if m.mode != "forward":
            raise CallError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {m.name!r} was loaded for generation; call Generate, or load it with "
                "mode 'forward'",
            )
        w = self.workers.get(m.workers[-1])
        if w is None or w.state == "lost":
            raise CallError(grpc.StatusCode.UNAVAILABLE, f"the last worker of {m.name!r} is gone")
        try:
            return w.stub.Forward(request, timeout=timeout)
        except grpc.RpcError as e:
            raise CallError(e.code(), e.details() or "") from e

    def release_all(self, m: ModelRecord) -> None:
        # the stage that drives the data plane first: its STOP ends the other stages' loops
        order = m.workers if m.mode == "generate" else m.workers[::-1]
        for wid in order:
            w = self.workers.get(wid)
            if w is None:
                continue
            try:
                w.stub.Release(pb.ReleaseRequest(model=m.name), timeout=60)
                w.status = pb.WorkerStatus(worker_id=wid, state="idle")  # before a heartbeat
            except grpc.RpcError as e:
                log.warning("release of %s on %s failed: %s", m.name, wid, e.code())
            w.model = ""


class InferenceServicer(pbg.InferenceServicer):
    """The client API.  With ``PIPESERVE_CLIENT_TOKEN`` set, calls need it as a bearer token."""

    def __init__(self, c: Coordinator) -> None:
        self.c = c

    def _authorize(self, context: grpc.ServicerContext) -> None:
        self.c.authorize_client(context)

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        yield from self.c.relay_generate(request, context)

    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        try:
            return self.c.forward(request, rpc.remaining(context))
        except CallError as e:
            context.abort(e.code, e.message)

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        with self.c.lock:
            return pb.ListModelsResponse(models=[m.info() for m in self.c.models.values()])


def _check_token(context: grpc.ServicerContext, token: str, what: str, env: str) -> None:
    """No token: UNAUTHENTICATED; a wrong one: PERMISSION_DENIED."""
    denied = rpc.bearer_error(context.invocation_metadata(), token, what)
    if denied is not None:
        context.abort(denied[0], f"{denied[1]} ({env})")


def _stage_workers(plan: Plan, placed: Placement | None) -> list[WorkerRecord]:
    """The worker a balanced plan gives each stage (empty without a placement)."""
    if placed is None:
        return []
    return [placed.workers[s.worker if s.worker >= 0 else s.index] for s in plan.stages]


class AdminServicer(pbg.AdminServicer):
    """Admin API; with ``PIPESERVE_ADMIN_TOKEN`` set, every call must carry the metadata
    ``authorization: Bearer <token>`` (else UNAUTHENTICATED)."""

    def __init__(self, c: Coordinator) -> None:
        self.c = c
        self.token = os.environ.get("PIPESERVE_ADMIN_TOKEN", "")

    def _authorize(self, context: grpc.ServicerContext) -> None:
        if not self.token:
            return
        _check_token(context, self.token, "admin calls", "PIPESERVE_ADMIN_TOKEN")

    def _placement(
        self, checkpoint: str, policy: Policy, dtype: str, workload: Workload, mode: str
    ) -> Placement | None:
        """For ``balanced``: the idle workers to plan over (fastest first), their memory and
        relative speeds, the KV budget to reserve, and unit times profiled on one of them."""
        with self.c.lock:
            idle = self.c.idle()
        top = max((w.speed for w in idle), default=0.0)

        def rank(w: WorkerRecord) -> tuple[int, float, int]:  # fastest first, then by age
            fast = w.speed >= top * (1 - SAME_SPEED)
            return (0, 0.0, w.seq) if fast else (1, -w.speed, w.seq)

        idle.sort(key=rank)
        n = policy.stages or len(idle)
        if n < 1 or len(idle) < n:
            return None  # not enough workers yet: plan without them (LoadModel refuses)
        chosen = idle[:n]
        if not workload.kv_tokens and mode == "generate":
            workload.kv_tokens = min(w.kv_tokens for w in chosen)
        ref = chosen[0]
        times: dict[str, float] | None = None
        times_from = "flops"
        try:
            r = ref.stub.Profile(
                pb.ProfileRequest(
                    checkpoint=checkpoint,
                    dtype=dtype,
                    workload=pb.Workload(
                        batch=workload.batch, seq=workload.seq, chunks=workload.chunks
                    ),
                ),
                timeout=PROFILE_TIMEOUT_S,
            )
            times, times_from = dict(r.unit_seconds), f"worker {ref.id} ({r.device_name})"
        except grpc.RpcError as e:
            log.warning("profiling on %s failed (%s): planning by FLOPs", ref.id, e.details())
        return Placement(
            workers=chosen,
            policy=Policy.balanced(
                n,
                memory=[w.memory if w.memory > 0 else UNKNOWN_MEMORY for w in chosen],
                speeds=relative_speeds([w.speed for w in chosen]),
            ),
            unit_seconds=times,
            times_from=times_from,
        )

    def _default_mode(self, checkpoint: str) -> str:
        """:func:`_default_mode`, reading nothing outside the model roots (``_plan`` then
        refuses such a path)."""
        if "\x00" in checkpoint or len(checkpoint) > MAX_PATH:
            return "forward"
        if not confined(checkpoint, self.c.model_roots):
            return "forward"
        return _default_mode(checkpoint)

    def _plan(
        self,
        checkpoint: str,
        policy: pb.SplitPolicy,
        dtype: str,
        context: Any,
        trace: bool = False,
        workload: pb.Workload | None = None,
        mode: str = "generate",
    ) -> tuple[Plan, Placement | None]:
        if "\x00" in checkpoint or len(checkpoint) > MAX_PATH:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"checkpoint path {rpc.clip(checkpoint)} holds a NUL byte or is longer than "
                f"{MAX_PATH} characters",
            )
        if not confined(checkpoint, self.c.model_roots):
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"checkpoint {rpc.clip(checkpoint)} is outside the model roots "
                f"{[str(r) for r in self.c.model_roots]} (coordinator --model-root)",
            )
        if not checkpoint or not Path(checkpoint).is_dir():
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"checkpoint directory {rpc.clip(checkpoint)} does not exist on the coordinator",
            )
        try:
            # one dtype for the plan and the worker that profiles: the checkpoint's by default
            dtype = dtype_name(resolve_dtype(ModelSource(checkpoint=checkpoint), dtype or None))
            pol = policy_from_proto(policy)
            wl = rpc.workload_from_proto(workload or pb.Workload())
            wl.check()
            placed = None
            if pol.kind == "balanced":
                placed = self._placement(checkpoint, pol, dtype, wl, mode)
                if placed is not None:
                    pol = placed.policy
                else:
                    pol.stages = pol.stages or 1
                    wl.profile = False
            plan = make_plan(
                ModelSource(checkpoint=checkpoint),
                pol,
                dtype=dtype,
                trace=trace,
                workload=wl,
                unit_seconds=placed.unit_seconds if placed else None,
            )
            return plan, placed
        except Exception as e:
            rpc.abort_for(context, e)
            raise

    def PlanModel(self, request: pb.PlanModelRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        plan, placed = self._plan(
            request.checkpoint,
            request.policy,
            request.dtype,
            context,
            workload=request.workload,
            mode=self._default_mode(request.checkpoint),
        )
        timed = bool(plan.estimate)
        total = sum(s.seconds if timed else s.flops for s in plan.stages) or 1
        chosen = _stage_workers(plan, placed)
        return pb.PlanModelResponse(
            plan_json=plan.dumps(),
            stages=[
                pb.StageSummary(
                    stage=s.index,
                    bytes=s.nbytes,
                    units=s.units,
                    compute_fraction=(s.seconds if timed else s.flops) / total,
                    seconds=s.seconds,
                    kv_bytes_per_token=s.kv_bytes_per_token,
                    worker_id=chosen[s.index].id if chosen else "",
                )
                for s in plan.stages
            ],
            samples_per_s=plan.estimate.get("samples_per_s", 0.0),
            bubble=plan.estimate.get("bubble", 0.0),
            streaming_samples_per_s=plan.estimate.get("streaming_samples_per_s", 0.0),
            times_from=placed.times_from if placed else ("flops" if timed else ""),
        )

    def LoadModel(self, request: pb.LoadModelRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        c = self.c
        name = request.name or Path(request.checkpoint).name
        if not 0 < len(name) <= MAX_NAME or not name.isprintable():
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"model name {rpc.clip(name)}: give 1 to {MAX_NAME} printable characters",
            )
        with c.lock:
            if name in c.models:
                context.abort(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"model {name!r} is already loaded; unload it first",
                )
        mode = request.mode or self._default_mode(request.checkpoint)
        if mode not in ("generate", "forward"):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"mode must be generate or forward, not {rpc.clip(mode)}",
            )
        plan, placed = self._plan(
            request.checkpoint,
            request.policy,
            request.dtype,
            context,
            trace=mode == "forward",
            workload=request.workload,
            mode=mode,
        )
        with c.lock:
            idle = c.idle()
            if len(idle) < plan.num_stages:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the plan has {plan.num_stages} stages but only {len(idle)} idle workers "
                    "are registered; start more `pipeserve worker` processes",
                )
            chosen = _stage_workers(plan, placed)
            if not chosen or any(w not in idle for w in chosen):
                chosen = idle[: plan.num_stages]
            m = ModelRecord(
                name, request.checkpoint, plan, [w.id for w in chosen], next(c._epochs), mode
            )
            m.device = request.device
            c.models[name] = m
            for w in chosen:
                w.model = name
        c.health.set(f"pipeserve.model.{name}", False)
        error = c.assign(m)
        if error is not None:
            self._fail(m, error)
            context.abort(grpc.StatusCode.UNAVAILABLE, m.error)
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while True:
            stages = []
            for k, w in enumerate(chosen):
                try:
                    st = w.stub.Status(pb.StatusRequest(), timeout=10)
                except grpc.RpcError as e:
                    st = pb.WorkerStatus(state="failed", error=f"unreachable: {e.code()}")
                stages.append(
                    pb.StageProgress(
                        stage=k,
                        worker_id=w.id,
                        bytes_loaded=st.bytes_loaded,
                        bytes_total=st.bytes_total or plan.stages[k].nbytes,
                        state=st.state,
                        error=st.error,
                    )
                )
            failed = [s for s in stages if s.state == "failed"]
            ready = all(s.state == "ready" for s in stages)
            if failed:
                self._fail(m, f"stage {failed[0].stage}: {failed[0].error}")
            elif ready:
                m.state = pb.MODEL_STATE_READY
                c.health.set(f"pipeserve.model.{name}", True)
                if c.state is not None:
                    c.state.save(m)
            elif time.monotonic() > deadline or not context.is_active():
                self._fail(m, "loading timed out" if context.is_active() else "load cancelled")
            done = m.state != pb.MODEL_STATE_LOADING
            yield pb.LoadProgress(
                model=name, stages=stages, done=done, state=m.state, dtype=m.plan.dtype
            )
            if done:
                if m.state == pb.MODEL_STATE_FAILED:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, m.error)
                return
            time.sleep(0.2)

    def _fail(self, m: ModelRecord, error: str) -> None:
        m.state, m.error = pb.MODEL_STATE_FAILED, error
        self.c.release_all(m)
        with self.c.lock:
            self.c.models.pop(m.name, None)
        self.c.prune_store(m.name)

    def UnloadModel(self, request: pb.UnloadModelRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        m = self.c.model(request.name, context, ready=False)
        m.state = pb.MODEL_STATE_UNLOADING
        self.c.health.set(f"pipeserve.model.{m.name}", False)
        self.c.release_all(m)
        with self.c.lock:
            self.c.models.pop(m.name, None)
        self.c.prune_store(m.name)
        if self.c.state is not None:
            self.c.state.delete(m.name)
        return pb.UnloadModelResponse()

    def ClusterStatus(self, request: pb.ClusterStatusRequest, context: Any) -> Any:
        self._authorize(context)
        now = time.monotonic()
        with self.c.lock:
            workers = [
                pb.WorkerInfo(
                    id=w.id,
                    address=w.address,
                    device=w.device,
                    state=w.state,
                    memory_bytes=w.memory,
                    model=w.model,
                    stage=w.status.stage,
                    seconds_since_heartbeat=now - w.last_seen,
                    kv_sequences=w.status.kv_sequences,
                    kv_bytes=w.status.kv_bytes,
                    speed_gflops=w.speed,
                    device_name=w.device_name,
                    rpc_bytes=w.status.rpc_bytes,
                )
                for w in self.c.workers.values()
            ]
            models = [m.info() for m in self.c.models.values()]
        return pb.ClusterStatusResponse(workers=workers, models=models)

    def Timeline(self, request: pb.TimelineRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        m = self.c.model(request.model, context)
        events = []
        for wid in m.workers:
            w = self.c.workers.get(wid)
            if w is None:
                continue
            try:
                events += w.stub.Timeline(request, timeout=30).events
            except grpc.RpcError as e:
                log.warning("timeline from %s failed: %s", wid, e.code())
        return pb.TimelineResponse(events=sorted(events, key=lambda e: (e.stage, e.start)))

    def DrainWorker(self, request: pb.DrainWorkerRequest, context: grpc.ServicerContext) -> Any:
        """No new work for the worker; if it serves a stage and a spare exists, the stage
        moves to the spare now (in-flight requests are replayed, none fails)."""
        self._authorize(context)
        with self.c.lock:
            w = self.c.workers.get(request.worker_id)
            if w is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no worker {rpc.clip(request.worker_id)}")
            assert w is not None
            w.draining = True
            m = self.c.models.get(w.model)
            spare = bool(self.c.idle())
        if m is not None and m.mode == "generate" and request.worker_id in m.workers:
            if not spare:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{w.id} is draining but serves stage {m.workers.index(w.id)} of "
                    f"{m.name!r} and no spare worker can take it; start a worker",
                )
            self.c.recover(m, [request.worker_id], drained=True)
        with self.c.lock:
            if not w.model:  # its stage moved (or it had none): it is a spare now
                w.draining = False
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
                age.add_metric([w.id, w.state], now - w.last_seen)
            for m in self.c.models.values():
                models.add_metric([m.name, pb.ModelState.Name(m.state)], 1)
        yield age
        yield models


def confined(path: str, roots: list[Path]) -> bool:
    """Whether ``path`` resolves (symlinks and ``..`` followed) inside one of ``roots``
    (no roots: anything goes)."""
    if not roots:
        return True
    real = Path(path).resolve()
    return any(real == r.resolve() or real.is_relative_to(r.resolve()) for r in roots)


def _default_mode(checkpoint: str) -> str:
    """``generate`` for Hugging Face models that can generate, else ``forward``."""
    try:
        from pipeline_core.source import _hf_model_class, hf_config

        cls = _hf_model_class(hf_config(checkpoint))
        return "generate" if getattr(cls, "can_generate", lambda: False)() else "forward"
    except Exception:  # not an HF checkpoint (or unreadable): the planner reports it
        return "forward"


def serve(
    host: str = "0.0.0.0",
    port: int = 50051,
    *,
    advertise_host: str | None = None,
    stop: threading.Event | None = None,
    ready: Any = None,
    metrics_port: int = 0,
    health_port: int = 0,
    model_roots: list[str] | None = None,
    worker_timeout: float = LOST_AFTER_S,
    state_db: str = "",
    max_streams_per_client: int = 0,
) -> None:
    """Run the coordinator until ``stop`` is set (or forever)."""
    from coordinator.kserve import KServeServicer
    from coordinator.registry import RegistryServicer
    from pipeserve.inference import grpc_predict_v2_pb2_grpc as kg

    advertise = advertise_host or (host if host not in ("0.0.0.0", "::", "") else socket.getfqdn())
    server, port, health, _ = rpc.make_server(
        rpc.host_port(host, port), [*SERVICES, "inference.GRPCInferenceService"]
    )
    c = Coordinator(health)
    c.model_roots = [Path(r) for r in model_roots or []]
    c.lost_after = worker_timeout
    if state_db:
        c.state = StateStore(state_db)
        for m in c.state.load():
            c.models[m.name] = m
            c._epochs = itertools.count(max(m.epoch + 1, next(c._epochs)))
            health.set(f"pipeserve.model.{m.name}", False)
        if c.models:
            print(f"restored {len(c.models)} model(s) from {state_db}", flush=True)
    serve_metrics(c.registry, metrics_port, host if host not in ("", "::") else "0.0.0.0")
    c.max_streams_per_client = max_streams_per_client
    pbg.add_InferenceServicer_to_server(InferenceServicer(c), server)
    pbg.add_AdminServicer_to_server(AdminServicer(c), server)
    pbg.add_RegistryServicer_to_server(RegistryServicer(c), server)
    kg.add_GRPCInferenceServiceServicer_to_server(KServeServicer(c), server)
    server.start()
    for s in ["", *SERVICES, "inference.GRPCInferenceService"]:
        health.set(s, True)
    health_server = (
        rpc.serve_health_only(health, rpc.host_port(host, health_port)) if health_port else None
    )
    print(f"coordinator listening on {rpc.host_port(advertise, port)}", flush=True)
    if ready is not None:
        ready(port)
    stop = stop or threading.Event()
    threading.Thread(target=c.monitor, args=(stop,), name="monitor", daemon=True).start()
    stop.wait()
    # [Note: stopping] take no new calls (health NOT_SERVING, the server refuses), give calls
    # in flight STOP_GRACE_S, then exit; deployments live on in --state-db, and the workers
    # keep their stages and relink when a coordinator comes back.
    for s in ["", *SERVICES, "inference.GRPCInferenceService"]:
        health.set(s, False)
    log.info("coordinator stopping (%.0f s grace for calls in flight)", STOP_GRACE_S)
    server.stop(grace=STOP_GRACE_S).wait()
    if health_server is not None:
        health_server.stop(grace=1).wait()
