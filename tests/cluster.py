"""The test harness for a real cluster: a coordinator and stage workers started through the
command line as separate processes on 127.0.0.1 (``pipeserve.launch``, as ``pipeserve local``
starts them), with free ports, one log file per process, and waits.

``Cluster(tmp)`` starts a coordinator and 3 workers and waits until they registered;
``running_cluster`` is the module fixture body that also loads a small Llama as "small".
The tests' reference tokens are ``greedy`` (``pipeserve.reference.hf_greedy``).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pipeserve.launch import LOOPBACK, Processes, free_port, wait_status
from pipeserve.reference import hf_greedy
from pipeserve.v1 import pipeserve_pb2 as pb
from pipeserve.v1 import pipeserve_pb2_grpc as pbg

from .models import lm_model, save_hf

__all__ = [
    "KV_BUDGET",
    "ROOT",
    "Cluster",
    "cli",
    "code",
    "greedy",
    "port",
    "running_cluster",
    "scrape",
]

ROOT = Path(__file__).resolve().parent.parent
KV_BUDGET = 1000
"""Each worker's ``--max-kv-tokens`` unless a test asks otherwise."""
greedy = hf_greedy


def port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_port()


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m pipeserve ARGS`` run to completion (stdout and stderr captured as text)."""
    return subprocess.run(
        [sys.executable, "-m", "pipeserve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def code(fn: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    """The status code and details of the ``grpc.RpcError`` ``fn()`` must raise."""
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


class Cluster:
    """A coordinator and one worker per entry of ``workers`` (extra CLI args; default: 3 plain
    workers), each a ``python -m pipeserve`` process logging to ``logs/<command>-<k>.log``.

    ``kv_budget``: each worker's ``--max-kv-tokens`` (0: the worker's default); ``metrics``:
    give every process a ``/metrics`` port (``metrics_ports``: coordinator first);
    ``env``: added to the processes' environment; ``coordinator_args``: extra coordinator flags.
    """

    def __init__(
        self,
        logs: Path,
        workers: Sequence[Sequence[str]] | None = None,
        *,
        coordinator_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        kv_budget: int = KV_BUDGET,
        metrics: bool = True,
    ) -> None:
        workers = workers if workers is not None else [[], [], []]
        self.port = port()
        self.address = f"127.0.0.1:{self.port}"
        self.logs = Path(logs)
        self.processes = Processes(self.logs, env=env, cwd=ROOT)
        self.procs = self.processes.procs  # coordinator first, then the workers in order
        self.metrics_ports = [port() for _ in range(1 + len(workers))] if metrics else []
        try:
            self._start("coordinator", "--port", str(self.port), *coordinator_args)
            self.channel = grpc.insecure_channel(self.address)
            grpc.channel_ready_future(self.channel).result(timeout=120)
            for extra in workers:
                budget = ["--max-kv-tokens", str(kv_budget)] if kv_budget else []
                self._start("worker", "--coordinator", self.address, *budget, *extra)
            self.admin = pbg.AdminStub(self.channel)
            self.inference = pbg.InferenceStub(self.channel)
            self.wait(lambda st: len(st.workers) >= len(workers), what="workers did not register")
        except BaseException:
            self.close()
            raise

    def _start(self, command: str, *args: str) -> subprocess.Popen:
        k = len(self.procs)
        metrics = ["--metrics-port", str(self.metrics_ports[k])] if self.metrics_ports else []
        return self.processes.start(f"{command}-{k}", command, *args, *LOOPBACK, *metrics)

    def log(self, k: int, tail: int = 0) -> str:
        """The log of the ``k``-th process started (0: the coordinator)."""
        return self.processes.log(self.processes.names[k], tail)

    def status(self) -> pb.ClusterStatusResponse:
        return self.admin.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)

    def wait(
        self, ok: Callable[[pb.ClusterStatusResponse], bool], timeout: float = 120, what: str = ""
    ) -> pb.ClusterStatusResponse:
        """Poll the cluster's status until ``ok(status)`` (TimeoutError: ``what`` failed)."""
        return wait_status(self.admin, ok, timeout, what or "the cluster did not get there")

    def health(self, address: str, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

    def load(self, name: str, directory: str, stages: int = 3) -> list[pb.LoadProgress]:
        """Load ``self.ckpt / directory`` as ``name`` over ``stages`` stages (equal_size) and
        wait."""
        req = pb.LoadModelRequest(
            name=name,
            checkpoint=str(self.ckpt / directory),
            policy=pb.SplitPolicy(equal_size=stages),
        )
        return list(self.admin.LoadModel(req, timeout=300))

    def generate(
        self, model: str, prompt: list[int], new: int, timeout: float = 120, **kw: Any
    ) -> list[int]:
        """The tokens of one ``Generate`` call (``kw``: more ``GenerateRequest`` fields)."""
        req = pb.GenerateRequest(
            model=model, token_ids=pb.TokenIds(ids=prompt), max_new_tokens=new, **kw
        )
        out: list[int] = []
        for r in self.inference.Generate(req, timeout=timeout):
            out += list(r.token_ids)
        return out

    def close(self) -> None:
        self.processes.stop()


def running_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A coordinator + 3 workers with "small" loaded (for module fixtures: each test module
    defines its own, so modules interleaved on one xdist worker keep separate clusters)."""
    tmp = tmp_path_factory.mktemp("cluster")
    small = lm_model("llama")
    save_hf(small, tmp / "small")
    c = Cluster(tmp)
    c.small = small
    c.ckpt = tmp
    try:
        serving = health_pb2.HealthCheckResponse.SERVING
        c.workers = [w.address for w in c.status().workers]
        c.serving_before = [c.health(a, "pipeserve.v1.StageWorker") == serving for a in c.workers]
        assert all(c.health(a) == serving for a in c.workers)  # liveness: "" always
        c.load_cli = cli(
            "admin",
            "load",
            str(tmp / "small"),
            "--name",
            "small",
            "--stages",  # balanced by time: units profiled on a worker
            "3",
            "--coordinator",
            c.address,
        )
        yield c
    finally:
        c.close()


def scrape(port: int) -> dict[str, float]:
    """A process's Prometheus text on ``port`` -> {'name{labels}': value}."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
