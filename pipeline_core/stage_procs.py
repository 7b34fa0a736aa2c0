"""One lifecycle for stage processes on this machine, shared by :class:`~.local.LocalPipeline`
(forward) and :class:`~.local_generate.LocalGenerator` (generation).

The caller makes a :class:`StageProcesses`: a ``TCPStore`` (rank 0, here) that the stage
processes join, and ``spawn``-started processes, one per remote stage.  Each process calls
:func:`stage_setup`, then :func:`build_and_report` to build its stage (loading only its shard)
and report ``ready/<k>`` with its load figures -- or ``error/<k>`` with why it could not -- then
serves until told to stop.  :meth:`StageProcesses.wait_ready` raises the stage's own error, a
dead process's exit code, or a timeout; :meth:`StageProcesses.close` joins and kills.
"""

from __future__ import annotations

import datetime
import json
import logging
import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .load import ReadStats

__all__ = [
    "StageProcesses",
    "build_and_report",
    "connect",
    "memory_probe",
    "root_log_level",
    "stage_setup",
    "td",
    "wait_ready",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class memory_probe:
    """Peak memory of this process while its checkpoint is read (Linux ``/proc``).

    ``ru_maxrss`` is useless for a spawned child (exec folds the parent's peak into it), so we
    read ``VmHWM`` and reset it at :meth:`mark` (``/proc/self/clear_refs``).
    """

    def __init__(self) -> None:
        self.rss_before = 0
        self.reset_ok = False

    def mark(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset_ok = True
        except OSError:
            self.reset_ok = False
        self.rss_before = _status_kib("VmRSS") * 1024

    def report(self, stats: ReadStats) -> dict[str, Any]:
        peak = _status_kib("VmHWM") * 1024
        return {
            "bytes_read": stats.total_bytes,
            "files": dict(stats.bytes_by_file),
            "tensors": len(stats.tensors),
            "rss_before_load": self.rss_before,
            "peak_rss_load": peak if self.reset_ok else None,
            "rss_after_load": _status_kib("VmRSS") * 1024,
        }


def wait_ready(
    store: dist.Store, procs: dict[int, Any], timeout_s: float
) -> dict[int, dict[str, Any]]:
    """Wait until every stage process has reported ``ready/<k>`` (its load report) in the
    store; raise with the stage's own error, or when its process died, or at the timeout."""
    deadline = time.monotonic() + timeout_s
    info: dict[int, dict[str, Any]] = {}
    while len(info) < len(procs):
        for k, p in procs.items():
            if k in info:
                continue
            if store.check([f"error/{k}"]):
                err = store.get(f"error/{k}").decode()
                raise RuntimeError(f"stage {k} failed to start: {err}")
            if store.check([f"ready/{k}"]):
                info[k] = json.loads(store.get(f"ready/{k}"))
            elif not p.is_alive():
                raise RuntimeError(f"stage {k} process died (exit code {p.exitcode})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"stages not ready after {timeout_s:.0f}s")
        time.sleep(0.02)
    return info


def td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def root_log_level() -> int:
    """This process's logging level, for stage processes to log as it does."""
    return logging.getLogger().getEffectiveLevel()


def stage_setup(threads: int, log_level: int | str) -> None:
    """First thing in a stage process: its torch threads and its logging."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=log_level)


def connect(port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """A stage process's client of the caller's store."""
    return dist.TCPStore("127.0.0.1", port, world_size, False, timeout=td(timeout_s))


def build_and_report(
    store: dist.Store, index: int, build: Callable[[ReadStats, memory_probe], T]
) -> T | None:
    """Build stage ``index`` (``build(stats, probe)``: the probe marks where loading starts)
    and report ``ready/<index>`` with its load figures; on failure report ``error/<index>``
    for the caller, which raises it, and return None."""
    try:
        stats, probe = ReadStats(), memory_probe()
        stage = build(stats, probe)
        store.set(f"ready/{index}", json.dumps(probe.report(stats)))
        return stage
    except Exception as e:  # report any failure to the caller, which raises it
        store.set(f"error/{index}", f"{type(e).__name__}: {e}")
        return None


class StageProcesses:
    """Stage processes on this machine around a store they join (``world_size`` members)."""

    def __init__(self, world_size: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.store = dist.TCPStore(
            "127.0.0.1", 0, world_size, True, timeout=td(timeout_s), wait_for_workers=False
        )
        self.procs: dict[int, mp.process.BaseProcess] = {}

    @property
    def port(self) -> int:
        return self.store.port

    def start(self, target: Callable[..., None], args: dict[int, tuple[Any, ...]]) -> None:
        """Start one process per stage: ``target(*args[k])`` for stage ``k``."""
        ctx = mp.get_context("spawn")
        self.procs = {k: ctx.Process(target=target, args=a, daemon=True) for k, a in args.items()}
        for p in self.procs.values():
            p.start()

    def wait_ready(self) -> dict[int, dict[str, Any]]:
        """Every process's load report (see :func:`wait_ready`)."""
        return wait_ready(self.store, self.procs, self.timeout_s)

    def join(self, timeout: float = 30) -> None:
        """Wait for the processes to end (after they were told to stop)."""
        for p in self.procs.values():
            p.join(timeout=timeout)

    def kill(self) -> None:
        """End any process still alive."""
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def close(self, timeout: float = 30) -> None:
        try:
            self.join(timeout)
        finally:
            self.kill()
