"""Forming a model's ring: every stage assigned to its worker, then one polling loop until
all are ready -- the loop a load reports progress from and every recovery waits on."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .client import Assignment
from .errors import WorkerCallFailed
from .records import ModelRecord, ModelState, WorkerRecord, WorkerState, WorkerStatus

__all__ = ["LOAD_TIMEOUT_S", "Forming", "Progress", "StageProgress"]

LOAD_TIMEOUT_S = 900.0
POLL_S = 0.2


@dataclass
class StageProgress:
    stage: int
    worker_id: str
    state: str
    bytes_loaded: int = 0
    bytes_total: int = 0
    error: str = ""


@dataclass
class Progress:
    """One look at a model's stages while they load; the last has ``done`` (and ``error``
    unless every stage is ready)."""

    model: str
    dtype: str = ""
    stages: list[StageProgress] = field(default_factory=list)
    done: bool = False
    error: str = ""
    state: ModelState = ModelState.LOADING
    """The model's state after this look (READY on the last of a load that succeeded)."""


class Forming:
    """The forming half of :class:`coordinator.core.Coordinator` (a mixin: it uses the
    coordinator's ``workers`` and ``models``)."""

    workers: dict[str, WorkerRecord]
    models: dict[str, ModelRecord]

    def form(
        self, m: ModelRecord, is_active: Callable[[], bool] = lambda: True
    ) -> Iterator[Progress]:
        """Assign every stage of ``m`` to its worker (its current workers and epoch; the
        rendezvous is this coordinator's :class:`Rendezvous`), then poll the workers until
        every stage is ready, one failed or was lost, the model was unloaded, loading timed
        out, or ``is_active`` turned false.  Yields each poll; the last is ``done``."""
        plan_json = m.plan.dumps()
        try:
            for k, wid in enumerate(m.workers):
                a = Assignment(
                    model=m.name,
                    plan_json=plan_json,
                    stage=k,
                    world_size=m.plan.num_stages,
                    epoch=m.epoch,
                    device=m.device,
                    mode=m.mode,
                )
                self.workers[wid].client.assign(a, timeout=30)
        except WorkerCallFailed as e:
            yield Progress(m.name, m.plan.dtype, done=True, error=f"assigning a stage failed: {e}")
            return
        except KeyError as e:
            yield Progress(m.name, m.plan.dtype, done=True, error=f"worker {e} is gone")
            return
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while True:
            p = Progress(m.name, m.plan.dtype)
            for k, wid in enumerate(m.workers):
                w = self.workers.get(wid)
                if w is None or w.state == WorkerState.LOST:
                    p.error = p.error or f"{wid} was lost"
                    st = WorkerStatus(state="failed", error="lost")
                else:
                    try:
                        st = w.status = w.client.status(timeout=10)  # fresher than a heartbeat
                    except WorkerCallFailed as e:
                        st = WorkerStatus(state="failed", error=str(e))
                    if st.state == "failed":
                        p.error = p.error or f"stage {k} ({wid}): {st.error}"
                p.stages.append(
                    StageProgress(
                        k,
                        wid,
                        st.state,
                        st.bytes_loaded,
                        st.bytes_total or m.plan.stages[k].nbytes,
                        st.error,
                    )
                )
            if m.name not in self.models:
                p.error = "unloaded"
            elif not p.error and time.monotonic() > deadline:
                p.error = "loading timed out"
            elif not p.error and not is_active():
                p.error = "load cancelled"
            p.done = bool(p.error) or all(s.state == "ready" for s in p.stages)
            yield p
            if p.done:
                return
            time.sleep(POLL_S)
