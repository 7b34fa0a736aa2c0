"""Run a split model across processes: per-stage loops and the driver that feeds them.

Ranks: the driver (the caller, which owns inputs and gets outputs back) is rank 0 of the
*edge* group; stage ``k`` is rank ``k + 1``.  On CPU the edge group (gloo) also carries
stage-to-stage activations.  On CUDA, activations between stages use a separate NCCL group
(stage ``k`` = rank ``k``) and only inputs/outputs cross the gloo edge group.

Routing comes from the traced wiring (:class:`~pipeline_core.trace.Wire`): for every
(producer, consumer) pair we know which values flow, so a value may skip stages, and a later
stage may read a model input directly.  Within one microbatch a consumer receives from its
producers in a fixed order (driver first, then stages ascending); every producer sends without
blocking, so the fill-drain order of :mod:`.schedule` cannot deadlock.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .microbatch import merge_microbatches, split_microbatches
from .schedule import fill_drain
from .stage import Stage
from .trace import WHOLE, Wire
from .transport import Channel

__all__ = ["Driver", "Mesh", "Routes", "serve_stage"]

log = logging.getLogger(__name__)

DRIVER = -1
OP_STOP, OP_RUN = 0, 1


@dataclass
class Routes:
    """What flows between each producer (DRIVER or stage) and consumer (stage or DRIVER)."""

    num_stages: int
    flows: dict[tuple[int, int], list[Any]] = field(default_factory=dict)
    """(producer, consumer) -> sorted keys: input names from DRIVER, output indices of stages."""

    @classmethod
    def from_wiring(cls, args: list[list[Wire]], outputs: list[Wire]) -> Routes:
        flows: dict[tuple[int, int], set[Any]] = defaultdict(set)
        for k, stage_args in enumerate(args):
            for w in stage_args:
                if w.src == "input":
                    flows[(DRIVER, k)].add(w.name)
                elif w.src == "stage":
                    flows[(w.stage, k)].add(w.index)
        for w in outputs:
            if w.src == "stage":
                flows[(w.stage, DRIVER)].add(w.index)
            elif w.src == "input":
                flows[(DRIVER, DRIVER)].add(w.name)
        return cls(len(args), {k: sorted(v, key=str) for k, v in flows.items()})

    def producers(self, consumer: int) -> list[int]:
        return sorted(p for (p, c) in self.flows if c == consumer and p != consumer)

    def consumers(self, producer: int) -> list[int]:
        return sorted(
            (c for (p, c) in self.flows if p == producer and c != producer),
            key=lambda c: (c == DRIVER, c),
        )


def _pick(raw: Any, index: int) -> Any:
    return raw if index == WHOLE else raw[index]


def _resolve(w: Wire, received: dict[tuple[int, Any], Any]) -> Any:
    if w.src == "const":
        return w.value
    if w.src == "input":
        return received[(DRIVER, w.name)]
    return received[(w.stage, w.index)]


class Mesh:
    """The channels one process uses: to the driver/edge, and between stages."""

    def __init__(self, edge: Channel, stages: Channel | None = None) -> None:
        self.edge = edge
        self.stages = stages  # None: stage traffic uses the edge group

    def send(self, values: list[Any], src: int, dst: int) -> None:
        if DRIVER in (src, dst) or self.stages is None:
            if DRIVER in (src, dst):
                values = [_to_cpu(v) for v in values]
            self.edge.send(values, dst + 1)
        else:
            self.stages.send(values, dst)

    def recv(self, src: int, dst: int) -> list[Any]:
        if DRIVER in (src, dst) or self.stages is None:
            return self.edge.recv(src + 1)
        return self.stages.recv(src)

    def flush(self) -> None:
        self.edge.flush()
        if self.stages is not None:
            self.stages.flush()


def _to_cpu(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.cpu()
    if isinstance(v, tuple | list):
        return type(v)(_to_cpu(x) for x in v)
    return v


@dataclass
class StageTimes:
    compute_s: float = 0.0
    wait_s: float = 0.0
    microbatches: int = 0


def serve_stage(stage: Stage, mesh: Mesh) -> StageTimes:
    """Run ``stage`` until the driver says stop. Returns time spent computing vs waiting."""
    routes = Routes.from_wiring(stage.args, stage.outputs)
    me = stage.index
    times = StageTimes()
    while True:
        op, n = mesh.recv(DRIVER, me)
        if op == OP_STOP:
            mesh.flush()
            return times
        for action in fill_drain(routes.num_stages, n)[me]:
            if action.op == "R":
                t0 = time.perf_counter()
                received: dict[tuple[int, Any], Any] = {}
                for p in routes.producers(me):
                    vals = mesh.recv(p, me)
                    for key, v in zip(routes.flows[(p, me)], vals, strict=True):
                        received[(p, key)] = v.to(stage.device) if torch.is_tensor(v) else v
                times.wait_s += time.perf_counter() - t0
            elif action.op == "F":
                t0 = time.perf_counter()
                raw = stage.forward([_resolve(w, received) for w in stage.my_args])
                times.compute_s += time.perf_counter() - t0
                times.microbatches += 1
            else:
                for c in routes.consumers(me):
                    mesh.send([_pick(raw, i) for i in routes.flows[(me, c)]], me, c)
        mesh.flush()


class Driver:
    """Feeds microbatches to the stages and gathers the outputs (rank 0 of the edge group)."""

    def __init__(self, mesh: Mesh, args: list[list[Wire]], outputs: list[Wire]) -> None:
        self.mesh = mesh
        self.outputs = outputs
        self.routes = Routes.from_wiring(args, outputs)
        self.input_names = sorted({w.name for a in args for w in a if w.src == "input"})

    def run(self, inputs: dict[str, Any], chunks: int = 1) -> Any:
        """One fill-drain pass over ``inputs`` (cut into ``chunks`` microbatches)."""
        micro = split_microbatches(inputs, chunks)
        routes = self.routes
        for s in range(routes.num_stages):
            self.mesh.send([OP_RUN, len(micro)], DRIVER, s)
        for mb in micro:
            for c in routes.consumers(DRIVER):
                if c != DRIVER:
                    self.mesh.send([mb[k] for k in routes.flows[(DRIVER, c)]], DRIVER, c)
        results = []
        for mb in micro:
            got: dict[tuple[int, Any], Any] = {}
            for p in routes.producers(DRIVER):
                vals = self.mesh.recv(p, DRIVER)
                for key, v in zip(routes.flows[(p, DRIVER)], vals, strict=True):
                    got[(p, key)] = v
            for name in routes.flows.get((DRIVER, DRIVER), []):
                got[(DRIVER, name)] = mb[name]
            outs = [_resolve(w, got) for w in self.outputs]
            results.append(outs[0] if len(outs) == 1 else tuple(outs))
        self.mesh.flush()
        return merge_microbatches(results)

    def stop(self) -> None:
        for s in range(self.routes.num_stages):
            self.mesh.send([OP_STOP, 0], DRIVER, s)
        self.mesh.flush()


def gloo_group(store: dist.Store, rank: int, size: int, timeout_s: float) -> dist.ProcessGroup:
    import datetime

    return dist.ProcessGroupGloo(store, rank, size, datetime.timedelta(seconds=timeout_s))


def nccl_group(store: dist.Store, rank: int, size: int, timeout_s: float) -> dist.ProcessGroup:
    import datetime

    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    return dist.ProcessGroupNCCL(store, rank, size, opts)
