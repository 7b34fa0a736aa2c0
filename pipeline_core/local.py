"""Start stage processes on this machine and drive them from the calling process.

Used by tests and the embedded default (``pipeserve local``).  Each stage process rebuilds its
stage from the plan (loading only its shard), joins the process group and serves until the
pipeline is closed.  The caller is the driver: ``pipe(input_ids=..., chunks=4)`` returns the
model's output.  By default the caller also hosts the last stage (see :mod:`.runtime`), so the
output never crosses a process boundary; ``host_last_stage=False`` puts every stage in its own
process.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .errors import PlanError
from .load import ReadStats
from .microbatch import check_chunks
from .plan import Plan
from .runtime import DRIVER, Driver, RankMap, make_mesh, serve_stage
from .source import check_inputs
from .stage import Stage, build_stage
from .stage_procs import (
    StageProcesses,
    build_and_report,
    connect,
    memory_probe,
    root_log_level,
    stage_setup,
)
from .trace import Wire, restructure

__all__ = ["LocalPipeline", "make_mesh", "memory_probe"]

log = logging.getLogger(__name__)

WIRING_KEY = "wiring"
"""Store key where stage 0 puts the pipeline's wiring when no stage runs in the driver."""


def _wiring_json(args: list[list[Wire]], outputs: list[Wire]) -> dict[str, Any]:
    return {
        "args": [[w.to_json() for w in a] for a in args],
        "outputs": [w.to_json() for w in outputs],
    }


def _wiring_from_json(d: dict[str, Any]) -> tuple[list[list[Wire]], list[Wire]]:
    args = [[Wire.from_json(w) for w in a] for a in d["args"]]
    return args, [Wire.from_json(w) for w in d["outputs"]]


def _stage_main(
    plan_json: str,
    index: int,
    port: int,
    device: str,
    threads: int,
    timeout_s: float,
    host_last: bool,
    log_level: int | str,
) -> None:
    stage_setup(threads, log_level)
    plan = Plan.from_json(plan_json)
    ranks = RankMap(plan.num_stages, host_last)
    store = connect(port, ranks.world_size, timeout_s)

    def build(stats: ReadStats, probe: memory_probe) -> Stage:
        stage = build_stage(plan, index, device, stats=stats, on_traced=probe.mark)
        if index == 0 and not host_last:  # the driver's wiring, set before ready/0
            store.set(WIRING_KEY, json.dumps(_wiring_json(stage.args, stage.outputs)))
        return stage

    stage = build_and_report(store, index, build)
    if stage is None:
        return
    mesh = make_mesh(store, ranks, index, device, timeout_s)
    times = serve_stage(stage, mesh)
    store.set(f"times/{index}", json.dumps(vars(times)))


class LocalPipeline:
    """A plan's stages running in local processes, driven from this process.

    Args:
        plan: the plan to run.
        devices: one device per stage (default: all ``cpu``); CUDA stages talk over NCCL.
        threads_per_stage: torch intra-op threads in each stage process (and, for the hosted
            last stage, in this process while it runs).
        host_last_stage: run the last stage in this process (default) instead of its own.
            Loading it resets this process's ``VmHWM`` (peak RSS in ``/proc``) to measure the
            load's peak memory.
        timeout_s: start-up and data-plane timeout.
        log_level: the stage processes' logging level (default: this process's).
    """

    def __init__(
        self,
        plan: Plan,
        *,
        devices: list[str] | None = None,
        threads_per_stage: int = 1,
        host_last_stage: bool = True,
        timeout_s: float = 300.0,
        log_level: int | str | None = None,
    ) -> None:
        self.plan = plan
        self.threads = threads_per_stage
        n = plan.num_stages
        devices = devices or ["cpu"] * n
        if len(devices) != n:
            raise PlanError(f"{n} stages need {n} devices, got {len(devices)}")
        self.ranks = ranks = RankMap(n, host_last_stage)
        self.stage_procs = StageProcesses(ranks.world_size, timeout_s)
        self.store = self.stage_procs.store
        plan_json = json.dumps(plan.to_json())
        level = root_log_level() if log_level is None else log_level
        rest = (threads_per_stage, timeout_s, host_last_stage, level)
        self.stage_procs.start(
            _stage_main,
            {k: (plan_json, k, self.store.port, devices[k], *rest) for k in ranks.remote_stages()},
        )
        self.procs = self.stage_procs.procs
        self._closed = True
        try:
            hosted: Stage | None = None
            local_info = {}
            if host_last_stage:
                stats, probe = ReadStats(), memory_probe()
                with _threads(threads_per_stage):
                    hosted = build_stage(
                        plan, n - 1, devices[-1], stats=stats, on_traced=probe.mark
                    )
                local_info = {n - 1: probe.report(stats)}
            remote = self.stage_procs.wait_ready()
            self.stage_info = [local_info.get(k) or remote[k] for k in range(n)]
            mesh = make_mesh(self.store, ranks, DRIVER, devices[-1], timeout_s)
        except BaseException:
            self._kill()
            raise
        if hosted is None:  # stage 0 reported the wiring it traced: no trace here
            args, outputs = _wiring_from_json(json.loads(self.store.get(WIRING_KEY)))
        else:
            args, outputs = hosted.args, hosted.outputs
        self.driver = Driver(mesh, args, outputs, hosted=hosted)
        self._closed = False

    def __call__(self, *args: Any, chunks: int = 1, **inputs: Any) -> Any:
        """Run the model on a batch; positional args follow the plan's input order."""
        if self._closed:
            raise RuntimeError("pipeline is closed")
        names = [s.name for s in self.plan.inputs]
        if len(args) > len(names):
            raise TypeError(f"expected at most {len(names)} positional inputs ({names})")
        inputs.update(zip(names, args, strict=False))
        return self.map([inputs], chunks)[0]

    def _check(self, inputs: dict[str, Any]) -> None:
        check_inputs(self.plan.inputs, inputs, self.driver.input_names)

    def map(self, batches: list[dict[str, Any]], chunks: int = 1) -> list[Any]:
        """Run several batches back to back without draining the pipeline between them.

        Each batch is a dict of named inputs; returns one output per batch, in order.
        """
        return list(self.imap(batches, chunks))

    def imap(self, batches: Iterable[dict[str, Any]], chunks: int = 1) -> Iterator[Any]:
        """Like :meth:`map`, yielding each batch's output as soon as it is complete (so the
        caller need not hold every output).  Exhaust it before using the pipeline again."""
        batches = list(batches)
        if self._closed:
            raise RuntimeError("pipeline is closed")
        for b in batches:
            self._check(b)
        check_chunks(chunks, self.plan.rows_mixed)
        with _threads(self.threads if self.driver.hosted else torch.get_num_threads()):
            for out in self.driver.run_iter(batches, chunks):
                yield restructure(out, self.plan.output_tree)

    def stage_times(self) -> list[dict[str, float]]:
        """Compute/wait seconds per stage (after close)."""
        out = []
        for k in range(self.plan.num_stages):
            if k in self.procs:
                out.append(json.loads(self.store.get(f"times/{k}")))
            elif self.driver.hosted is not None:
                out.append(vars(self.driver.hosted.times))
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.driver.stop()
        finally:
            self.stage_procs.close()

    def _kill(self) -> None:
        self.stage_procs.kill()

    def __enter__(self) -> LocalPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _threads:
    def __init__(self, n: int) -> None:
        self.n = n
        self.saved = 0

    def __enter__(self) -> None:
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.saved)
