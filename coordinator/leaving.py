"""A worker leaving on SIGTERM (``HeartbeatRequest.leaving``): its stage moves to an idle
spare as ``Admin.DrainWorker`` moves it (in-flight streams replayed, none lost), then it may
exit.  Without a spare its stage is given up at once (the model waits for a worker, requests
fail fast with UNAVAILABLE) instead of after ``--worker-timeout``."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

__all__ = ["leave"]

log = logging.getLogger(__name__)


def leave(c: Any, wid: str) -> bool:
    # c: the coordinator.core.Coordinator (not imported: core imports this module)
    """Handle one ``leaving`` heartbeat of ``wid``; True when the worker may exit now."""
    with c.lock:
        w = c.workers.get(wid)
        if w is None:
            return True
        w.draining = True  # never a spare again
        w.last_seen = time.monotonic()  # alive while its stage moves: not lost meanwhile
        m = c.models.get(w.model) if w.model else None
        if m is None or wid not in m.workers:  # serves nothing (any more): forget it
            del c.workers[wid]
            log.info("worker %s left", wid)
            return True
        if (w.leaving and not m.waiting) or m.recovering:
            return False  # the move is under way
        if w.leaving or m.mode != "generate" or not c.idle():
            # no spare (or the move found none and the model waits for one): give it up
            w.last_seen = float("-inf")  # lost now: the monitor gives the stage up
            log.warning(
                "worker %s leaves stage %d of %s with no idle spare to take it",
                wid,
                m.workers.index(wid),
                m.name,
            )
            return True
        w.leaving = True
    log.info("worker %s is leaving: moving its stage of %s to a spare", wid, m.name)
    threading.Thread(target=_move, args=(c, m, wid), name=f"leave-{wid}", daemon=True).start()
    return False


def _move(c: Any, m: Any, wid: str) -> None:
    try:
        c.recover(m, [wid], drained=True)
    except Exception:
        log.exception("moving the stage of leaving worker %s failed", wid)
