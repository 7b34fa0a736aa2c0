"""Graceful shutdown on SIGTERM (``docker stop``, Kubernetes), with real processes: a worker
that serves a stage moves it to an idle spare (in-flight streams replayed, none lost) and
exits within seconds; a coordinator stops cleanly and ``--state-db`` brings its model back
without a reload.  Also: a worker registers under ``--worker-id`` and is Ready (health
``pipeserve.worker.registered``) while idle, not only while serving a stage."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pipeserve.v1 import pipeserve_pb2 as pb
from stage_worker.lifecycle import REGISTERED

from .cluster import port as _port
from .fleet import Fleet, many_streams
from .models import lm_model, save_hf

pytestmark = pytest.mark.slow

EXIT_WITHIN_S = 10.0


def _health(port: int, service: str) -> int:
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(ch)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _sigterm(proc) -> threading.Thread:
    """SIGTERM ``proc``; the returned thread, once joined, has ``seconds``: signal to exit."""

    def wait() -> None:
        proc.wait(timeout=60)
        waiter.seconds = time.monotonic() - t0

    waiter = threading.Thread(target=wait)
    waiter.seconds = float("inf")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    waiter.start()
    return waiter


def test_sigterm_drains_worker_and_stops_coordinator(tmp_path):
    save_hf(lm_model("llama"), tmp_path / "m")
    fleet = Fleet(tmp_path, "--state-db", str(tmp_path / "state.db"))
    try:
        fleet.add_worker(3)
        fleet.load(tmp_path / "m", 3)
        # an idle spare under a stable id (a StatefulSet pod name): Ready while idle
        port = _port()
        spare = fleet.spawn(
            "worker", "--coordinator", fleet.address, "--port", str(port), "--worker-id", "pod-3"
        )
        fleet.workers[port] = spare
        fleet.wait(lambda st: any(w.id == "pod-3" and w.state == "idle" for w in st.workers))
        serving = health_pb2.HealthCheckResponse.SERVING
        deadline = time.monotonic() + 10
        while _health(port, REGISTERED) != serving:  # set at its next heartbeat
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert _health(port, "pipeserve.v1.StageWorker") != serving  # serves no stage

        prompts = [[1 + i, 2 + i % 7, 3, 4 + i % 5] for i in range(12)]
        undisturbed, errors = many_streams(fleet, prompts, lambda: None)
        assert not errors and all(len(o) for o in undisturbed)

        # 1. SIGTERM the stage-1 worker with 12 streams in flight: it moves its stage to the
        #    spare and exits; every stream is token-identical to the undisturbed run
        victim = fleet.process_of_stage(1)
        epoch = fleet.model().epoch
        waiters: list[threading.Thread] = []
        outs, errors = many_streams(fleet, prompts, lambda: waiters.append(_sigterm(victim)))
        waiters[0].join()
        took = waiters[0].seconds
        assert victim.returncode == 0 and took < EXIT_WITHIN_S, (victim.returncode, took)
        assert not errors, errors[:3]
        assert outs == undisturbed
        m = fleet.model()
        assert m.state == pb.MODEL_STATE_READY and m.epoch > epoch
        st = fleet.admin.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)
        assert [w.id for w in st.workers if w.model == "m" and w.stage == 1] == ["pod-3"]
        assert len(st.workers) == 3  # the leaver is gone, not "lost"

        # 2. SIGTERM the coordinator: it exits cleanly; a new one restores the model from
        #    --state-db and the workers relink, no reload
        waiter = _sigterm(fleet.coordinator)
        waiter.join()
        assert fleet.coordinator.returncode == 0 and waiter.seconds < EXIT_WITHIN_S, waiter.seconds
        fleet.start_coordinator()
        deadline = time.monotonic() + 60
        while fleet.model().state != pb.MODEL_STATE_READY:
            assert time.monotonic() < deadline, fleet.model()
            time.sleep(0.2)
        after: list[int] = []
        fleet.stream(prompts[0], after, errors)
        assert not errors and after == undisturbed[0]
    finally:
        fleet.close()
