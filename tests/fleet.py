"""A restartable cluster for fault tests: a coordinator (``--worker-timeout 2``) and workers
added one at a time, each a ``python -m pipeserve`` child started through
``pipeserve.launch.Processes`` (one log file per process in the test's tmp dir), that a test
kills, stops, SIGTERMs or restarts; ``many_streams`` runs streams while a fault happens.
(``tests/cluster.py`` is the fixed 3-worker cluster most tests share.)"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from pipeserve.launch import Processes, wait_status
from pipeserve.v1 import pipeserve_pb2 as pb
from pipeserve.v1 import pipeserve_pb2_grpc as pbg

from .cluster import ROOT
from .cluster import port as free_port

__all__ = ["NEW", "Fleet", "many_streams", "run_streams", "stream_into"]

NEW = 40
"""Tokens each stream generates."""


class Fleet:
    def __init__(self, tmp: Path, *coordinator_args: str) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.tmp = tmp
        self.coordinator_args = coordinator_args
        self.procs = Processes(tmp, env={"PIPESERVE_DATAPLANE_TIMEOUT": "20"}, cwd=ROOT)
        self.workers: dict[int, subprocess.Popen] = {}  # gRPC port -> process
        self.start_coordinator()

    def start_coordinator(self) -> None:
        self.coordinator = self.spawn(
            "coordinator",
            "--port",
            str(self.port),
            "--worker-timeout",
            "2",
            *self.coordinator_args,
        )
        ch = grpc.insecure_channel(self.address)
        grpc.channel_ready_future(ch).result(timeout=120)
        self.admin, self.inference = pbg.AdminStub(ch), pbg.InferenceStub(ch)

    def spawn(self, *args: str) -> subprocess.Popen:
        """``pipeserve ARGS`` on 127.0.0.1, logging to ``<command>-<n>.log``."""
        name = f"{args[0]}-{len(self.procs.procs)}"
        common = ["--host", "127.0.0.1", "--advertise-host", "127.0.0.1"]
        return self.procs.start(name, *args, *common)

    def add_worker(self, n: int = 1, *, may_serve: bool = False) -> None:
        """Start ``n`` workers together (their start-ups overlap) and wait until each is
        registered and idle -- or, with ``may_serve`` (a model is waiting for a worker), in any
        state but lost: the coordinator may put it to work before a status poll sees it idle."""
        ports: list[int] = []
        while len(ports) < n:  # distinct: each is bound only once its worker starts
            if (p := free_port()) not in ports and p not in self.workers:
                ports.append(p)
        for port in ports:
            self.workers[port] = self.spawn(
                "worker", "--coordinator", self.address, "--port", str(port)
            )

        def seen(st: pb.ClusterStatusResponse) -> set[int]:
            return {
                int(w.address.rsplit(":", 1)[1])
                for w in st.workers
                if w.state == "idle" or (may_serve and w.state != "lost")
            }

        self.wait(lambda st: set(ports) <= seen(st))

    def load(self, checkpoint: Path, stages: int) -> None:
        """Load ``checkpoint`` as model "m" in ``stages`` equal-size stages; returns when it is
        ready (LoadModel's progress stream ends)."""
        request = pb.LoadModelRequest(
            name="m", checkpoint=str(checkpoint), policy=pb.SplitPolicy(equal_size=stages)
        )
        list(self.admin.LoadModel(request, timeout=300))

    def wait(
        self, ok: Callable[[pb.ClusterStatusResponse], bool], timeout: float = 120.0
    ) -> pb.ClusterStatusResponse:
        return wait_status(self.admin, ok, timeout)

    def process_of_stage(self, stage: int) -> subprocess.Popen:
        st = self.admin.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)
        (w,) = [w for w in st.workers if w.model == "m" and w.stage == stage and w.state == "ready"]
        return self.workers[int(w.address.rsplit(":", 1)[1])]

    def model(self) -> pb.ModelInfo:
        (m,) = self.inference.ListModels(pb.ListModelsRequest(), timeout=10).models
        return m

    def stream(self, prompt: list[int], out: list, errors: list) -> None:
        stream_into(self.inference, prompt, out, errors, NEW)

    def close(self) -> None:
        for p in self.procs.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait(timeout=30)


def stream_into(inference: Any, prompt: list[int], out: list, errors: list, new: int) -> None:
    """Generate ``new`` greedy tokens for ``prompt`` from model "m", streamed into ``out``; a
    failed call lands in ``errors`` as (code, details)."""
    req = pb.GenerateRequest(
        model="m",
        token_ids=pb.TokenIds(ids=prompt),
        max_new_tokens=new,
        sampling=pb.SamplingParameters(ignore_eos=True),
    )
    try:
        for r in inference.Generate(req, timeout=300):
            out.extend(r.token_ids)
    except grpc.RpcError as e:
        errors.append((e.code(), e.details()))


def run_streams(
    stream: Callable[[list[int], list, list], None],
    prompts: list[list[int]],
    after: Callable[[], Any],
    wait_s: float = 60,
) -> tuple[list, list, Any]:
    """One ``stream(prompt, out, errors)`` thread per prompt; ``after()`` once every stream is
    under way (or ``wait_s`` passed); (outputs, errors, what ``after`` returned)."""
    outs: list[list[int]] = [[] for _ in prompts]
    errors: list = []
    threads = [
        threading.Thread(target=stream, args=(p, o, errors))
        for p, o in zip(prompts, outs, strict=True)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + wait_s
    while sum(map(len, outs)) < 2 * len(prompts) and time.monotonic() < deadline:
        time.sleep(0.01)  # every stream is under way
    result = after()
    for t in threads:
        t.join(300)
    return outs, errors, result


def many_streams(
    fleet: Fleet, prompts: list[list[int]], after: Callable[[], object]
) -> tuple[list, list]:
    """One stream per prompt; ``after()`` once every stream is under way; (outputs, errors)."""
    outs, errors, _ = run_streams(fleet.stream, prompts, after)
    return outs, errors
