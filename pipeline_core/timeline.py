"""Per-stage event recording for the pipeline timeline (bounded memory, cheap).

Each stage keeps its last ``capacity`` events: ``(kind, group, rows, start, end)`` with wall
clock times (``time.time()``; hosts should be NTP-synced), ``kind`` one of ``compute`` (a
stage step: prefill/decode of one micro-batch, sampling included on the last stage),
``send`` (handing the result to the next stage) and ``wait`` (blocked for the next message).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import NamedTuple

__all__ = ["Event", "Timeline"]


class Event(NamedTuple):
    kind: str
    group: int
    rows: int
    start: float
    end: float


class Timeline:
    def __init__(self, capacity: int = 20000) -> None:
        self._events: deque[Event] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def record(self, kind: str, group: int, rows: int, start: float, end: float) -> None:
        with self._lock:
            self._events.append(Event(kind, group, rows, start, end))

    def since(self, t: float) -> list[Event]:
        with self._lock:
            return [e for e in self._events if e.end >= t]

    def __len__(self) -> int:
        return len(self._events)


def now() -> float:
    return time.time()
