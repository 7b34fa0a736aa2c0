"""The coordinator's domain: workers register and heartbeat, models are planned, placed,
loaded, unloaded, drained and recovered.  No gRPC here: workers are reached through
:class:`coordinator.client.WorkerClient`, errors are :mod:`coordinator.errors`, and loading
reports progress as :class:`Progress` from one polling loop (:meth:`Forming.form`) that a
load and every recovery share.

It never holds weights or activations: only plans, token ids and text pass through it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from pipeline_core import Plan, Policy, Workload

from . import leaving
from .client import WorkerClient
from .errors import (
    AlreadyExists,
    InvalidRequest,
    LimitReached,
    NotFound,
    NotReady,
    Unavailable,
    WorkerCallFailed,
    clip,
)
from .forming import POLL_S, Forming, Progress
from .placement import Placement, plan_model, stage_workers
from .records import (
    LOST_AFTER_S,
    ModelRecord,
    ModelState,
    WorkerRecord,
    WorkerState,
    WorkerStatus,
)
from .recovery import Recovery
from .rendezvous import Rendezvous
from .store import StateStore

__all__ = ["MAX_NAME", "MAX_WORKERS", "Coordinator"]

log = logging.getLogger(__name__)

MAX_NAME = 128
"""Longest model name (names come back in every answer about the model)."""
MAX_WORKERS = 1024
"""Worker records at once (lost idle workers are pruned, so this bounds a registration flood)."""


class Health(Protocol):
    def set(self, service: str, serving: bool) -> None: ...


class Coordinator(Recovery, Forming):
    """Cluster state and what can be done with it (recovery: :class:`Recovery`)."""

    def __init__(
        self,
        health: Health,
        *,
        lost_after: float = LOST_AFTER_S,
        model_roots: list[Path] | None = None,
        max_streams_per_client: int = 0,
        state: StateStore | None = None,
    ) -> None:
        self.health = health
        self.model_roots = list(model_roots or [])
        self.lost_after = lost_after
        self.started = time.monotonic()
        self.instance = uuid.uuid4().hex[:4]
        self.max_streams_per_client = max_streams_per_client
        """Generate calls one client address may have in flight, over every API (0: any)."""
        self.client_streams: Counter[str] = Counter()
        self.state = state
        self.recoveries: list[dict[str, Any]] = []
        """Completed recoveries: model, lost workers, seconds from detection to ready."""
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.store = Rendezvous(self.changed)
        """The data plane's rendezvous records (bounded)."""
        self.workers: dict[str, WorkerRecord] = {}
        self.models: dict[str, ModelRecord] = {}
        self._ids = itertools.count(1)
        self._epochs = itertools.count(1)
        if state is not None:
            for m in state.load():
                self.models[m.name] = m
                self._epochs = itertools.count(max(m.epoch + 1, next(self._epochs)))
                health.set(_health_name(m.name), False)

    # ------------------------------------------------------------------ workers

    def register(
        self,
        address: str,
        client: WorkerClient,
        *,
        worker_id: str = "",
        device: str = "",
        memory: int = 0,
        speed: float = 0.0,
        device_name: str = "",
        kv_tokens: int = 0,
    ) -> str:
        """A worker joins (or comes back after a coordinator restart): its id."""
        with self.lock:
            if len(self.workers) >= MAX_WORKERS:
                raise LimitReached(f"{MAX_WORKERS} workers are registered already (the limit)")
            seq = next(self._ids)
            # unique across coordinator restarts: a worker heartbeating with an id from the
            # previous coordinator must not be mistaken for a new one
            wid = worker_id or f"w{seq}-{self.instance}"  # a pod's stable name
            while wid in self.workers:  # taken (never overwrite a live record)
                seq = next(self._ids)
                wid = f"{worker_id or 'w'}-{seq}-{self.instance}"
            self.workers[wid] = WorkerRecord(
                wid,
                address,
                device,
                memory,
                client,
                lost_after=self.lost_after,
                seq=seq,
                speed=speed,
                device_name=device_name,
                kv_tokens=kv_tokens,
            )
        log.info("worker %s registered from %s", wid, address)
        return wid

    def heartbeat(self, wid: str, status: WorkerStatus, leave: bool = False) -> tuple[bool, bool]:
        """A worker's heartbeat: (known, may_exit).  ``leave``: it is going (SIGTERM)."""
        if leave:
            known = wid in self.workers
            return known, leaving.leave(self, wid)
        with self.lock:
            w = self.workers.get(wid)
            if w is None:
                return False, False
            w.status = status
            w.last_seen = time.monotonic()
            self.relink(w)
        return True, False

    def idle(self) -> list[WorkerRecord]:
        """Workers that can take a stage, by registration (the caller holds ``lock``)."""
        return sorted(
            (w for w in self.workers.values() if w.state == WorkerState.IDLE and not w.model),
            key=lambda w: w.seq,
        )

    def relink(self, w: WorkerRecord) -> None:
        """A worker that re-registered after a coordinator restart and still serves a stage
        of a restored model takes its place again (caller holds the lock).  The model is
        READY once every stage is back at its epoch: the ring it left is whole again."""
        st = w.status
        m = self.models.get(st.model)
        if m is None or st.state != "ready" or st.epoch != m.epoch or w.model:
            return
        if m.recovering:
            # [Note: relink during a recovery] an attempt under way owns the model: it may
            # have dropped this epoch's other stages already, so the ring is not whole.  The
            # worker's stale stage is reclaimed and it serves as a spare; only the attempt
            # sets READY, after it re-formed the ring.
            return
        if not (0 <= st.stage < len(m.workers)) or m.workers[st.stage]:
            return
        m.workers[st.stage] = w.id
        w.model = m.name
        if all(m.workers):
            m.to(ModelState.READY, "")
            self.health.set(_health_name(m.name), True)
            self.changed.notify_all()
            log.warning("model %s restored (epoch %d)", m.name, m.epoch)

    def drain(self, wid: str) -> None:
        """No new work for the worker; if it serves a stage and a spare exists, the stage
        moves to the spare now (in-flight requests are replayed, none fails)."""
        with self.lock:
            w = self.workers.get(wid)
            if w is None:
                raise NotFound(f"no worker {clip(wid)}")
            w.draining = True
            m = self.models.get(w.model)
            spare = bool(self.idle())
        if m is not None and m.mode == "generate" and wid in m.workers:
            if not spare:
                raise NotReady(
                    f"{w.id} is draining but serves stage {m.workers.index(w.id)} of "
                    f"{m.name!r} and no spare worker can take it; start a worker"
                )
            self.recover(m, [wid], drained=True)
        with self.lock:
            if not w.model:  # its stage moved (or it had none): it is a spare now
                w.draining = False

    # ------------------------------------------------------------------ models

    def find(self, name: str, ready: bool = True) -> ModelRecord:
        """The model called ``name`` (raises NotFound, or NotReady when ``ready``)."""
        with self.lock:
            m = self.models.get(name)
            known = sorted(self.models)
        if m is None:
            raise NotFound(
                f"no model {clip(name)} (loaded: {', '.join(known) or 'none'}); load it with "
                "`pipeserve admin load`"
            )
        if ready and not m.ready:
            raise NotReady(
                f"model {name!r} is not ready ({m.state.name}{': ' + m.error if m.error else ''})"
            )
        return m

    def plan(
        self,
        checkpoint: str,
        policy: Policy,
        dtype: str,
        workload: Workload,
        *,
        trace: bool = False,
        mode: str = "generate",
    ) -> tuple[Plan, Placement | None]:
        """The plan for ``checkpoint`` on the idle workers (see :func:`plan_model`)."""
        with self.lock:
            idle = self.idle()
        return plan_model(
            checkpoint,
            policy,
            dtype,
            workload,
            roots=self.model_roots,
            idle=idle,
            trace=trace,
            mode=mode,
        )

    def load(
        self,
        name: str,
        checkpoint: str,
        policy: Policy,
        dtype: str,
        workload: Workload,
        *,
        mode: str,
        device: str = "",
        is_active: Callable[[], bool] = lambda: True,
    ) -> Iterator[Progress]:
        """Plan ``checkpoint``, give each stage to an idle worker and yield the progress
        until every stage is ready (the model is READY) or one failed (raises NotReady; the
        model is gone again).  ``is_active`` false: the caller went away (cancelled)."""
        if not 0 < len(name) <= MAX_NAME or not name.isprintable():
            raise InvalidRequest(
                f"model name {clip(name)}: give 1 to {MAX_NAME} printable characters"
            )
        with self.lock:
            if name in self.models:
                raise AlreadyExists(f"model {name!r} is already loaded; unload it first")
        if mode not in ("generate", "forward"):
            raise InvalidRequest(f"mode must be generate or forward, not {clip(mode)}")
        plan, placed = self.plan(
            checkpoint, policy, dtype, workload, trace=mode == "forward", mode=mode
        )
        with self.lock:
            idle = self.idle()
            if len(idle) < plan.num_stages:
                raise NotReady(
                    f"the plan has {plan.num_stages} stages but only {len(idle)} idle workers "
                    "are registered; start more `pipeserve worker` processes"
                )
            chosen = stage_workers(plan, placed)
            if not chosen or any(w not in idle for w in chosen):
                chosen = idle[: plan.num_stages]
            m = ModelRecord(
                name, checkpoint, plan, [w.id for w in chosen], next(self._epochs), mode
            )
            m.device = device
            self.models[name] = m
            for w in chosen:
                w.model = name
        self.health.set(_health_name(name), False)
        for p in self.form(m, is_active):
            if p.done and p.error:
                self._fail(m, p.error)
                if not p.stages:  # no stage could even be assigned
                    raise Unavailable(m.error)
                p.state = m.state
                yield p
                raise NotReady(m.error)
            if p.done:
                with self.changed:
                    if m.state is ModelState.UNLOADING:
                        raise NotReady(f"model {name!r} was unloaded while it loaded")
                    m.to(ModelState.READY)
                    self.changed.notify_all()
                self.health.set(_health_name(name), True)
                if self.state is not None:
                    self.state.save(m)
            p.state = m.state
            yield p

    def _fail(self, m: ModelRecord, error: str) -> None:
        """A load failed: its workers drop their stages, the model is gone."""
        with self.lock:
            m.to(ModelState.FAILED, error)
        self.release_all(m)
        with self.lock:
            self.models.pop(m.name, None)
        self.store.prune(m.name)

    def unload(self, name: str) -> None:
        m = self.find(name, ready=False)
        with self.lock:
            m.to(ModelState.UNLOADING)
        self.health.set(_health_name(m.name), False)
        self.release_all(m)
        with self.lock:
            self.models.pop(m.name, None)
        self.store.prune(m.name)
        if self.state is not None:
            self.state.delete(m.name)

    def release_all(self, m: ModelRecord) -> None:
        # the stage that drives the data plane first: its STOP ends the other stages' loops
        order = m.workers if m.mode == "generate" else m.workers[::-1]
        for wid in order:
            w = self.workers.get(wid)
            if w is None:
                continue
            try:
                w.client.release(m.name, abandon=False, timeout=60)
                w.idle_now()
            except WorkerCallFailed as e:
                log.warning("release of %s on %s failed: %s", m.name, wid, e)
            w.model = ""

    def prune_store(self, name: str, keep_epoch: int = -1) -> None:
        self.store.prune(name, keep_epoch)

    # ------------------------------------------------------------------ calls

    def stage0(self, name: str) -> tuple[ModelRecord, WorkerRecord]:
        """The model and its stage-0 worker, for a Generate call (raises Unavailable while
        it recovers or waits for a spare)."""
        m = self.models.get(name)
        if m is not None and m.waiting:
            raise Unavailable(m.waiting)
        if m is not None and m.recovering:
            raise Unavailable(f"model {m.name!r} is recovering from a lost worker")
        m = self.find(name)
        w = self.workers.get(m.workers[0])
        if w is None or w.state == WorkerState.LOST:
            raise Unavailable(f"the stage-0 worker of {m.name!r} is gone; reload the model")
        return m, w

    def forward(self, request: Any, timeout: float | None) -> Any:
        """Run a forward-mode model through its last-stage worker (which hosts the driver)."""
        m = self.find(request.model)
        if m.mode != "forward":
            raise NotReady(
                f"model {m.name!r} was loaded for generation; call Generate, or load it with "
                "mode 'forward'"
            )
        w = self.workers.get(m.workers[-1])
        if w is None or w.state == WorkerState.LOST:
            raise Unavailable(f"the last worker of {m.name!r} is gone")
        return w.client.forward(request, timeout)

    def timeline(self, request: Any) -> list[Any]:
        """Every stage's timeline events of ``request.model``."""
        m = self.find(request.model)
        events: list[Any] = []
        for wid in m.workers:
            w = self.workers.get(wid)
            if w is None:
                continue
            try:
                events += w.client.timeline(request, timeout=30)
            except WorkerCallFailed as e:
                log.warning("timeline from %s failed: %s", wid, e)
        return events

    def wait_recovered(self, name: str, epoch: int, is_active: Callable[[], bool]) -> bool:
        """After an upstream failure: True once the model is ready again under a newer epoch
        (replay), False if the failure was not a lost worker or no spare can take over."""
        grace = time.monotonic() + self.lost_after + 2.0  # time for heartbeats to go missing
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        with self.changed:
            while is_active():
                m = self.models.get(name)
                if m is None:
                    return False
                if m.waiting:
                    return False  # no spare: fail fast (the caller fails with UNAVAILABLE)
                if m.ready and m.epoch > epoch:
                    return True
                now = time.monotonic()
                if not m.recovering and m.epoch == epoch and now > grace:
                    return False
                if now > deadline:
                    return False
                self.changed.wait(POLL_S)
        return False


RECOVERY_TIMEOUT_S = 300.0
"""How long a relayed call waits for its model to be re-formed before failing."""


def _health_name(model: str) -> str:
    return f"pipeserve.model.{model}"
