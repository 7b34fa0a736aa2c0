"""Run a split model across processes: per-stage executors and the driver that feeds them.

Nodes are the driver (``DRIVER``: owns inputs, gets outputs back) and stages ``0..S-1``.  A
:class:`RankMap` places nodes on ranks of the *edge* group (gloo).  By default the driver
process also hosts the last stage (rank 0), so the model's output (e.g. logits, the largest
activation) never crosses a process boundary, and there is no idle extra process; stage ``k <
S-1`` is rank ``k + 1``.  With a separate driver, stage ``k`` is rank ``k + 1`` for every ``k``.

On CPU the edge group also carries stage-to-stage activations.  On CUDA, activations between
stages use a separate NCCL group (stage ``k`` = rank ``k``) and only inputs/outputs cross gloo --
when every stage is on its own GPU.  NCCL refuses two ranks on one GPU, and cannot reach a CPU
stage, so stages sharing a GPU, or a mix of CPU and CUDA stages, send through host memory over
gloo instead (:func:`nccl_between` decides, the same way on every rank).

Routing comes from the traced wiring (:class:`~pipeline_core.trace.Wire`): for every (producer,
consumer) pair we know which values flow, so a value may skip stages and a later stage may read
a model input directly.  Within one microbatch a consumer receives from its producers in a fixed
order (driver first, then stages ascending); producers never block on sends, and values between
two nodes of the same process go through a local queue; so the fill-drain order of
:mod:`.schedule` cannot deadlock.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .microbatch import merge_microbatches, split_microbatches
from .schedule import Action, fill_drain
from .stage import Stage
from .trace import WHOLE, Wire
from .transport import (
    Channel,
    StageFailure,
    device_identity,
    gloo_group,
    nccl_between,
    nccl_group,
    nccl_usable,
    use_device,
)

__all__ = [
    "DRIVER",
    "Driver",
    "Mesh",
    "RankMap",
    "Routes",
    "StageExecutor",
    "device_identity",
    "gloo_group",
    "make_mesh",
    "nccl_between",
    "nccl_group",
    "nccl_usable",
    "pick",
    "resolve",
    "serve_stage",
    "use_device",
]

log = logging.getLogger(__name__)

DRIVER = -1
CMD_STOP, CMD_RUN = 0, 1
"""What the driver tells a stage process: stop, or run the next ``n`` microbatches."""


@dataclass(frozen=True)
class RankMap:
    """Which edge-group rank each node (DRIVER or stage index) lives on."""

    num_stages: int
    driver_hosts_last: bool = True

    @property
    def world_size(self) -> int:
        return self.num_stages + (0 if self.driver_hosts_last else 1)

    def rank(self, node: int) -> int:
        if node == DRIVER or (self.driver_hosts_last and node == self.num_stages - 1):
            return 0
        return node + 1

    def remote_stages(self) -> list[int]:
        """Stages that run in their own process (not in the driver's)."""
        return [s for s in range(self.num_stages) if self.rank(s) != 0]


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
        return cls(len(args), {k: sorted(v, key=str) for k, v in flows.items()})

    @property
    def input_names(self) -> list[str]:
        """The model inputs some stage takes (the driver's flows), sorted."""
        return sorted({n for (p, _), keys in self.flows.items() if p == DRIVER for n in keys})

    def sent(self, producer: int) -> list[Any]:
        """Every output index of stage ``producer`` some consumer takes, sorted."""
        return sorted({i for (p, _), keys in self.flows.items() if p == producer for i in keys})

    def producers(self, consumer: int) -> list[int]:
        return sorted(p for (p, c) in self.flows if c == consumer)

    def consumers(self, producer: int) -> list[int]:
        return sorted((c for (p, c) in self.flows if p == producer), key=lambda c: (c == DRIVER, c))


def pick(raw: Any, index: int) -> Any:
    """Output ``index`` of a stage's raw result (``WHOLE``: all of it)."""
    return raw if index == WHOLE else raw[index]


def resolve(w: Wire, received: dict[tuple[int, Any], Any], inputs: dict[str, Any]) -> Any:
    """The value wire ``w`` carries: a constant, a model input (as received from the driver,
    else from ``inputs``) or a stage's output received as ``(stage, index)``."""
    if w.src == "const":
        return w.value
    if w.src == "input":
        return received.get((DRIVER, w.name), inputs.get(w.name))
    return received[(w.stage, w.index)]


class Mesh:
    """Moves value lists between nodes: a local queue within a process, else a channel."""

    def __init__(self, ranks: RankMap, edge: Channel, stages: Channel | None = None) -> None:
        self.ranks = ranks
        self.edge = edge
        self.stages = stages  # None: stage-to-stage traffic uses the edge group
        self._local: dict[tuple[int, int], deque[list[Any]]] = defaultdict(deque)

    def send(self, values: list[Any], src: int, dst: int) -> None:
        if self.ranks.rank(src) == self.ranks.rank(dst):
            self._local[(src, dst)].append(list(values))
        elif self.stages is not None and DRIVER not in (src, dst):
            self.stages.send(values, dst)
        else:
            self.edge.send([_to_cpu(v) for v in values], self.ranks.rank(dst))

    def recv(self, src: int, dst: int) -> list[Any]:
        if self.ranks.rank(src) == self.ranks.rank(dst):
            return self._local[(src, dst)].popleft()
        if self.stages is not None and DRIVER not in (src, dst):
            return self.stages.recv(src)
        return self.edge.recv(self.ranks.rank(src))

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


class StageExecutor:
    """Interprets one stage's schedule actions (R: receive, F: forward, S: send)."""

    def __init__(self, stage: Stage, mesh: Mesh, routes: Routes) -> None:
        self.stage = stage
        self.mesh = mesh
        self.routes = routes
        self.times = StageTimes()
        self._received: dict[tuple[int, Any], Any] = {}
        self._raw: Any = None
        self._failure: StageFailure | None = None

    def run(self, action: Action) -> None:
        me, routes = self.stage.index, self.routes
        if action.op == "R":
            t0 = time.perf_counter()
            self._received = {}
            self._failure = None
            for p in routes.producers(me):
                vals = self.mesh.recv(p, me)
                if vals and isinstance(vals[0], StageFailure):
                    self._failure = self._failure or vals[0]
                    continue
                for key, v in zip(routes.flows[(p, me)], vals, strict=True):
                    dev = self.stage.device
                    self._received[(p, key)] = v.to(dev) if torch.is_tensor(v) else v
            self.times.wait_s += time.perf_counter() - t0
        elif action.op == "F":
            t0 = time.perf_counter()
            if self._failure is not None:
                self._raw = self._failure  # an earlier stage failed on this microbatch
            else:
                try:
                    args = [resolve(w, self._received, {}) for w in self.stage.my_args]
                    self._raw = self.stage.forward(args)
                except Exception as e:  # a bad request must not kill the stage
                    log.warning("[stage %d] forward failed: %s", me, e)
                    msg = f"stage {me} failed: {type(e).__name__}: {e}"
                    self._raw = StageFailure(msg)
            self._received = {}
            self.times.compute_s += time.perf_counter() - t0
            self.times.microbatches += 1
        else:
            for c in routes.consumers(me):
                if isinstance(self._raw, StageFailure):
                    self.mesh.send([self._raw], me, c)
                else:
                    self.mesh.send([pick(self._raw, i) for i in routes.flows[(me, c)]], me, c)
            self._raw = None


def serve_stage(stage: Stage, mesh: Mesh) -> StageTimes:
    """Run ``stage`` in its own process until the driver says stop."""
    ex = StageExecutor(stage, mesh, Routes.from_wiring(stage.args, stage.outputs))
    while True:
        op, n = mesh.recv(DRIVER, stage.index)
        if op == CMD_STOP:
            mesh.flush()
            return ex.times
        for action in fill_drain(ex.routes.num_stages, n)[stage.index]:
            ex.run(action)
        mesh.flush()


class Driver:
    """Feeds microbatches to the stages and gathers the outputs (edge rank 0).

    With ``hosted`` (the last stage, built in this process) the driver runs that stage's
    actions itself, between feeding inputs and collecting outputs.
    """

    def __init__(
        self,
        mesh: Mesh,
        args: list[list[Wire]],
        outputs: list[Wire],
        hosted: Stage | None = None,
        window: int = 0,
    ) -> None:
        self.mesh = mesh
        self.window = window  # microbatches fed ahead of outputs; 0: twice the stage count
        self.outputs = outputs
        self.routes = Routes.from_wiring(args, outputs)
        self.input_names = self.routes.input_names
        self.hosted = StageExecutor(hosted, mesh, self.routes) if hosted is not None else None

    def run(self, inputs: dict[str, Any], chunks: int = 1) -> Any:
        """One fill-drain pass over ``inputs`` (cut into ``chunks`` microbatches)."""
        return self.run_many([inputs], chunks)[0]

    def run_many(self, batches: list[dict[str, Any]], chunks: int = 1) -> list[Any]:
        """All outputs of :meth:`run_iter`, in order."""
        return list(self.run_iter(batches, chunks))

    def run_iter(self, batches: list[dict[str, Any]], chunks: int = 1) -> Iterator[Any]:
        """Stream several batches through one fill-drain pass, yielding each batch's output
        as soon as it is complete: the pipeline fills once, and stage 0 starts the next batch
        while later stages still work on the previous one.

        Inputs are fed at most ``window`` microbatches ahead of the outputs collected, so the
        first stage cannot run far ahead of the last (bounded memory in every process).  The
        iterator must be exhausted before the pipeline is used again.
        """
        split = [split_microbatches(b, chunks) for b in batches]
        micro = [mb for s in split for mb in s]
        routes = self.routes
        window = self.window or 2 * routes.num_stages
        for s in self.mesh.ranks.remote_stages():
            self.mesh.send([CMD_RUN, len(micro)], DRIVER, s)
        fed = 0

        def feed(upto: int) -> None:
            nonlocal fed
            while fed < min(upto, len(micro)):
                for c in routes.consumers(DRIVER):
                    values = [micro[fed][k] for k in routes.flows[(DRIVER, c)]]
                    self.mesh.send(values, DRIVER, c)
                fed += 1

        feed(window)
        ends = list(itertools.accumulate(len(s) for s in split))
        results: list[Any] = []
        failure: StageFailure | None = None
        for i, mb in enumerate(micro):
            if self.hosted is not None:
                for op in "RFS":
                    self.hosted.run(Action(self.hosted.stage.index, op, i))
            got: dict[tuple[int, Any], Any] = {}
            for p in routes.producers(DRIVER):
                vals = self.mesh.recv(p, DRIVER)
                if vals and isinstance(vals[0], StageFailure):
                    failure = failure or vals[0]
                    continue
                for key, v in zip(routes.flows[(p, DRIVER)], vals, strict=True):
                    got[(p, key)] = v
            if failure is None:
                outs = [resolve(w, got, mb) for w in self.outputs]
                results.append(outs[0] if len(outs) == 1 else tuple(outs))
            feed(i + 1 + window)
            if i + 1 == ends[0]:
                ends.pop(0)
                if not ends:
                    self.mesh.flush()
                if failure is None:  # after a failure, drain the rest, then raise
                    yield merge_microbatches(results)
                results = []
        if failure is not None:
            raise RuntimeError(failure.message)

    def stop(self) -> None:
        for s in self.mesh.ranks.remote_stages():
            self.mesh.send([CMD_STOP, 0], DRIVER, s)
        self.mesh.flush()


def make_mesh(store: dist.Store, ranks: RankMap, node: int, device: str, timeout_s: float) -> Mesh:
    """Node ``node``'s (DRIVER or a stage) side of the data plane: the gloo edge group and,
    on CUDA, the NCCL stage group."""
    edge_rank = ranks.rank(node)
    edge = Channel(
        gloo_group(dist.PrefixStore("edge", store), edge_rank, ranks.world_size, timeout_s)
    )
    stages = None
    # A separate driver only talks over gloo; a driver hosting the last stage is that stage.
    # NCCL only when every stage has a GPU of its own (all stages agree through the store).
    joins_nccl = node != DRIVER or ranks.driver_hosts_last
    if joins_nccl:
        stage = ranks.num_stages - 1 if node == DRIVER else node
        use_device(device)
        nccl_store = dist.PrefixStore("nccl", store)
        if nccl_between(nccl_store, stage, ranks.num_stages, device):
            pg = nccl_group(nccl_store, stage, ranks.num_stages, timeout_s)
            stages = Channel(pg, device)
    return Mesh(ranks, edge, stages)
