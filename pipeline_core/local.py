"""Start N stage processes on this machine and drive them from the calling process.

Used by tests and the embedded default (``pipeserve local``).  Each stage process rebuilds its
stage from the plan (loading only its shard), joins the process group and serves until the
pipeline is closed.  The caller is the driver: ``pipe(input_ids=..., chunks=4)`` returns the
model's output, gathered back from the stages.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from .errors import PlanError
from .load import ReadStats
from .plan import Plan
from .runtime import Driver, Mesh, gloo_group, nccl_group, serve_stage
from .stage import build_stage, trace_plan
from .transport import Channel

__all__ = ["LocalPipeline"]

log = logging.getLogger(__name__)


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _stage_main(
    plan_json: str, index: int, port: int, device: str, threads: int, timeout_s: float
) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=os.environ.get("PIPESERVE_LOG", "WARNING"))
    plan = Plan.from_json(plan_json)
    world = plan.num_stages + 1
    store = dist.TCPStore("127.0.0.1", port, world, False, timeout=_td(timeout_s))
    try:
        rss0 = _peak_rss()
        stats = ReadStats()
        stage = build_stage(plan, index, device, stats=stats)
        info = {
            "bytes_read": stats.total_bytes,
            "files": dict(stats.bytes_by_file),
            "tensors": len(stats.tensors),
            "peak_rss_before": rss0,
            "peak_rss": _peak_rss(),
        }
        store.set(f"ready/{index}", json.dumps(info))
    except Exception as e:  # report any failure to the driver, which raises it
        store.set(f"error/{index}", f"{type(e).__name__}: {e}")
        return
    edge = Channel(gloo_group(dist.PrefixStore("edge", store), index + 1, world, timeout_s))
    stages = None
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
        pg = nccl_group(dist.PrefixStore("nccl", store), index, plan.num_stages, timeout_s)
        stages = Channel(pg, device)
    times = serve_stage(stage, Mesh(edge, stages))
    store.set(f"times/{index}", json.dumps(vars(times)))


def _td(seconds: float):  # type: ignore[no-untyped-def]
    import datetime

    return datetime.timedelta(seconds=seconds)


class LocalPipeline:
    """A plan's stages running in local processes, driven from this process.

    Args:
        plan: the plan to run.
        devices: one device per stage (default: all ``cpu``).
        threads_per_stage: torch intra-op threads in each stage process.
        timeout_s: start-up and data-plane timeout.
    """

    def __init__(
        self,
        plan: Plan,
        *,
        devices: list[str] | None = None,
        threads_per_stage: int = 1,
        timeout_s: float = 300.0,
    ) -> None:
        self.plan = plan
        n = plan.num_stages
        devices = devices or ["cpu"] * n
        if len(devices) != n:
            raise PlanError(f"{n} stages need {n} devices, got {len(devices)}")
        world = n + 1
        self.store = dist.TCPStore(
            "127.0.0.1", 0, world, True, timeout=_td(timeout_s), wait_for_workers=False
        )
        ctx = mp.get_context("spawn")
        self.procs = [
            ctx.Process(
                target=_stage_main,
                args=(
                    json.dumps(plan.to_json()),
                    k,
                    self.store.port,
                    devices[k],
                    threads_per_stage,
                    timeout_s,
                ),
                daemon=True,
            )
            for k in range(n)
        ]
        for p in self.procs:
            p.start()
        try:
            self.stage_info = self._wait_ready(timeout_s)
            pg = gloo_group(dist.PrefixStore("edge", self.store), 0, world, timeout_s)
        except BaseException:
            self._kill()
            raise
        _, traced = trace_plan(plan)
        self.driver = Driver(Mesh(Channel(pg)), traced.args, traced.outputs)
        self._closed = False

    def _wait_ready(self, timeout_s: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        info: list[dict[str, Any] | None] = [None] * len(self.procs)
        while any(i is None for i in info):
            for k, p in enumerate(self.procs):
                if info[k] is not None:
                    continue
                if self.store.check([f"error/{k}"]):
                    raise RuntimeError(
                        f"stage {k} failed to start: {self.store.get(f'error/{k}').decode()}"
                    )
                if self.store.check([f"ready/{k}"]):
                    info[k] = json.loads(self.store.get(f"ready/{k}"))
                elif not p.is_alive():
                    raise RuntimeError(
                        f"stage {k} process exited with code {p.exitcode} while loading"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(f"stages not ready after {timeout_s:.0f}s")
            time.sleep(0.05)
        return [i for i in info if i is not None]

    def __call__(self, *args: Any, chunks: int = 1, **inputs: Any) -> Any:
        """Run the model on a batch; positional args follow the plan's input order."""
        if self._closed:
            raise RuntimeError("pipeline is closed")
        names = [s.name for s in self.plan.inputs]
        if len(args) > len(names):
            raise TypeError(f"expected at most {len(names)} positional inputs ({names})")
        inputs.update(zip(names, args, strict=False))
        missing = [n for n in self.driver.input_names if n not in inputs]
        if missing:
            raise TypeError(f"missing inputs {missing}; the model takes {names}")
        return self.driver.run(inputs, chunks)

    def stage_times(self) -> list[dict[str, float]]:
        """Compute/wait seconds per stage (available after close)."""
        return [json.loads(self.store.get(f"times/{k}")) for k in range(len(self.procs))]

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            self.driver.stop()
            for p in self.procs:
                p.join(timeout=30)
        finally:
            self._kill()

    def _kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def __enter__(self) -> LocalPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
