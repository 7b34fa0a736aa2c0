"""Keeping generation models up: lost workers are detected, their stages move to spares, the
pipeline re-forms under a new epoch -- and a failed or interrupted re-formation is retried
until the model is READY again or unloaded.

[Note: recovery never stalls] A recovery used to run once, in the monitor thread, and only
while some worker counted as lost: when heartbeats resumed after a stall (the "lost" workers
were alive) or an attempt failed, nothing retried and the model stayed LOADING for good.  Now
the monitor looks at every model each tick: a recovering model whose attempt ended is tried
again (with backoff) on the workers it has -- every reachable one drops its half-formed
stage first -- and a model restored from ``--state-db`` whose workers did not all come back
at its epoch is re-formed on the live ones plus spares.  Each attempt runs in its own thread
(one per model at a time), so a slow load never holds up detection or other models, and no
lock is held across a call to a worker.  Workers that hold a stage nobody assigned them (a
stale job from before a stall or a restart) are told to drop it and become spares; lost
workers no model needs are forgotten after a while.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .errors import WorkerCallFailed
from .placement import spare_for
from .records import ModelRecord, ModelState, WorkerRecord, WorkerState

__all__ = ["Recovery"]

log = logging.getLogger(__name__)

RETRY_MAX_S = 10.0
"""Longest pause between two recovery attempts of one model (1, 2, 4, ... seconds)."""
PRUNE_AFTER = 3.0
"""A lost worker no model needs is forgotten after this many ``lost_after`` periods."""
TICK_S = 0.25
"""The monitor's period."""
STALL_S = 1.0
"""A monitor tick this late means the coordinator itself stalled (see credit_stall)."""


class Recovery:
    """The recovery half of :class:`coordinator.core.Coordinator` (a mixin: it uses the
    coordinator's ``workers``, ``models``, ``lock``, ``changed``, ``health`` and ``state``)."""

    workers: dict[str, WorkerRecord]
    models: dict[str, ModelRecord]
    lock: Any
    changed: threading.Condition
    health: Any
    state: Any
    lost_after: float
    started: float
    recoveries: list[dict[str, Any]]
    _epochs: Any

    idle: Any  # the coordinator's methods
    prune_store: Any
    form: Any

    # ------------------------------------------------------------------ the monitor

    def monitor(self, stop: threading.Event) -> None:
        """Each tick: forget long-lost workers, reclaim stale stages, and start a recovery
        for every generation model that needs one."""
        self.started = last = time.monotonic()  # restored models' workers count from here
        while not stop.wait(TICK_S):
            now = time.monotonic()
            self.credit_stall(now - last - TICK_S)
            last = now
            self.tick()

    def credit_stall(self, stalled: float) -> None:
        """The coordinator itself stalled for ``stalled`` seconds (CPU starvation on a host
        loading a 7B model, swapping, a long pause): heartbeats that arrived meanwhile sit
        unread in its queue, so the stall is not counted against any worker.  Without this,
        one stall longer than the heartbeat timeout counted every worker of every model lost
        at once and failed the requests in flight (seen with Bloom-7b1 on a 24 GiB host)."""
        if stalled < STALL_S:
            return
        log.warning(
            "the coordinator stalled %.1f s (host overloaded?); not counted against workers",
            stalled,
        )
        now = time.monotonic()
        with self.lock:
            for w in self.workers.values():
                w.last_seen = min(now, w.last_seen + stalled)

    def tick(self) -> None:
        """One look at every worker and model (the monitor's; tests call it directly)."""
        try:
            self._prune_lost()
            self._reclaim_stale()
            for m in list(self.models.values()):
                self._check(m)
        except Exception:  # keep monitoring whatever happens
            log.exception("monitor tick failed")

    def _lost(self, wid: str) -> bool:
        w = self.workers.get(wid)
        return w is None or w.state == WorkerState.LOST

    def _check(self, m: ModelRecord) -> None:
        if m.mode != "generate" or m.state is ModelState.UNLOADING:
            return
        now = time.monotonic()
        if not all(m.workers):  # restored after a coordinator restart
            # live workers at the model's epoch relink as they heartbeat; the rest of the
            # stages go to spares once they had time to come back
            if now > self.started + self.lost_after + 3 and now >= m.retry_at:
                self._start(m, [])
            return
        lost = [w for w in m.workers if self._lost(w)]
        if lost and m.ready:
            self._start(m, lost)  # just detected
        elif m.recovering and now >= m.retry_at:
            # waiting for a spare, heartbeats resumed, or the last attempt failed: again
            self._start(m, lost)

    def _start(self, m: ModelRecord, lost: list[str]) -> None:
        if not m.busy.acquire(blocking=False):
            return  # an attempt is under way

        def run() -> None:
            try:
                self._recover(m, lost)
            except Exception as e:
                log.exception("recovery of %s failed", m.name)
                self._failed(m, f"{type(e).__name__}: {e}")
            finally:
                m.busy.release()

        threading.Thread(target=run, name=f"recover-{m.name}", daemon=True).start()

    def _prune_lost(self) -> None:
        now = time.monotonic()
        with self.lock:
            needed = {wid for m in self.models.values() for wid in m.workers}
            gone = [
                w.id
                for w in self.workers.values()
                if w.id not in needed and now - w.last_seen > PRUNE_AFTER * w.lost_after
            ]
            for wid in gone:
                self.workers.pop(wid)
        for wid in gone:
            log.warning("forgot worker %s (lost, serving nothing)", wid)

    def _reclaim_stale(self) -> None:
        """A live worker that reports a stage it was not given here (its job predates a stall
        that made it lost, or a coordinator restart, and did not relink) drops it."""
        with self.lock:
            stale = [
                w
                for w in self.workers.values()
                if not w.model
                and w.status.model
                and w.state not in (WorkerState.LOST, WorkerState.IDLE)
            ]
        for w in stale:
            log.warning("%s holds a stale stage of %r; releasing it", w.id, w.status.model)
            try:
                w.client.release(w.status.model, abandon=True, timeout=2)
            except WorkerCallFailed as e:
                log.warning("releasing the stale stage on %s failed: %s", w.id, e)
                continue
            with self.lock:
                if not w.model:
                    w.idle_now()

    # ------------------------------------------------------------------ one attempt

    def recover(self, m: ModelRecord, lost: list[str], drained: bool = False) -> None:
        """Move the stages of ``lost`` workers to spares and re-form ``m`` now, in this thread
        (``drained``: those workers are alive and leave on request).  Waits for an attempt
        under way; a failure is left to the monitor's retries."""
        with m.busy:
            try:
                self._recover(m, lost, drained)
            except Exception as e:
                log.exception("recovery of %s failed", m.name)
                self._failed(m, f"{type(e).__name__}: {e}")

    def _recover(self, m: ModelRecord, lost: list[str], drained: bool = False) -> None:
        t0 = time.monotonic()
        with self.changed:
            if m.name not in self.models or m.state is ModelState.UNLOADING:
                return
            if not lost and not m.recovering and self._whole(m):
                return  # restored: every worker relinked since the monitor looked
            first = not m.recovering
            m.recovering = True
            m.to(ModelState.LOADING)
            if lost:
                m.error = f"recovering: worker(s) {', '.join(lost)} lost"
            self.changed.notify_all()
        if first:
            log.warning("model %s lost %s; re-forming the pipeline", m.name, lost or "nothing")
        self.health.set(f"pipeserve.model.{m.name}", False)
        for call in list(m.calls):  # streams on the broken pipeline: the relays replay them
            call.cancel()
        # every reachable worker drops its stage of the broken ring (or of a failed attempt)
        for wid in m.workers:
            w = self.workers.get(wid) if wid else None
            if w is None or (wid in lost and not drained) or w.state == WorkerState.LOST:
                continue
            try:
                w.client.release(m.name, abandon=True, timeout=10)
                w.idle_now()  # before a heartbeat says so
            except WorkerCallFailed as e:
                log.warning("abandon on %s failed: %s", wid, e)
        with self.changed:
            spares = self.idle()
            # lost workers, and draining or leaving ones: a re-formed ring never keeps them
            replace = [
                k
                for k, wid in enumerate(m.workers)
                if wid in lost or self._lost(wid) or self.workers[wid].draining
            ]
            if len(spares) < len(replace):
                m.waiting = (
                    f"model {m.name!r} needs {len(replace)} more worker(s) and "
                    f"{len(spares) or 'no'} spare worker(s) are registered; start a "
                    "`pipeserve worker` and the model recovers by itself"
                )
                m.retry_at = time.monotonic() + 1.0
                self.changed.notify_all()
                return
            workers = list(m.workers)
            for k in replace:
                spare = spare_for(m.plan, k, spares)
                spares.remove(spare)
                if workers[k] in self.workers:
                    self.workers[workers[k]].model = ""
                workers[k] = spare.id
                spare.model = m.name
            m.waiting = ""
            m.workers = workers
            m.epoch = next(self._epochs)
        *_, last = self.form(m)  # the polling loop a load reports from
        if last.error:
            self._failed(m, last.error)
            return
        with self.changed:
            if m.name not in self.models:
                return
            m.to(ModelState.READY, "")
            m.recovering, m.attempts = False, 0
            self.recoveries.append(
                {"model": m.name, "lost": lost, "seconds": time.monotonic() - t0}
            )
            self.changed.notify_all()
        if self.state is not None:
            self.state.save(m)
        self.prune_store(m.name, m.epoch)
        self.health.set(f"pipeserve.model.{m.name}", True)
        log.warning("model %s ready again (epoch %d)", m.name, m.epoch)

    def _whole(self, m: ModelRecord) -> bool:
        """READY with every stage on a live worker that stays (the caller holds the lock)."""
        return (
            m.ready
            and all(m.workers)
            and not any(self._lost(w) or self.workers[w].draining for w in m.workers)
        )

    def _failed(self, m: ModelRecord, error: str) -> None:
        with self.changed:
            m.attempts += 1
            wait = min(RETRY_MAX_S, 2.0 ** (m.attempts - 1))
            m.retry_at = time.monotonic() + wait
            m.error = f"recovery failed: {error}; retrying in {wait:.0f}s"
            self.changed.notify_all()
        log.warning("model %s: %s", m.name, m.error)
