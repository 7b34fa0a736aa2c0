"""Surviving worker loss: a killed (SIGKILL) or hung (SIGSTOP) stage worker is detected by its
missing heartbeats, its stage moves to a spare worker, the survivors re-form the pipeline under
a new epoch (no restart), and every in-flight request is replayed with the tokens it already
streamed -- each client stream is token-identical to an undisturbed run.  Without a spare,
requests fail fast with UNAVAILABLE, and the model recovers by itself once a worker joins.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import grpc
import pytest

from pipeserve.v1 import pipeserve_pb2 as pb

from .cluster import code as _code
from .cluster import port as _port
from .cluster import scrape as _scrape
from .fleet import NEW, Fleet, many_streams
from .models import hf_greedy, lm_model, save_hf

pytestmark = pytest.mark.slow

SOAK_CYCLES = int(os.environ.get("PIPESERVE_SOAK_CYCLES", "1"))
"""Drain/kill/stall cycles of the soak (one in CI; set more for a long soak)."""


def _kserve_stream(
    fleet: Fleet, prompt: list[int], out: list, errors: list, new: int = NEW
) -> None:
    """``prompt`` through KServe's ModelStreamInfer (tritonclient's messages), one response
    per token, into ``out``."""
    import numpy as np
    from tritonclient.grpc import service_pb2 as kv2
    from tritonclient.grpc import service_pb2_grpc as kg

    req = kv2.ModelInferRequest(model_name="m", id="k")
    req.inputs.add(name="input_ids", datatype="INT64", shape=[1, len(prompt)])
    req.raw_input_contents.append(np.asarray(prompt, dtype="<i8").tobytes())
    req.parameters["max_tokens"].int64_param = new
    req.parameters["ignore_eos"].bool_param = True
    stub = kg.GRPCInferenceServiceStub(grpc.insecure_channel(fleet.address))
    try:
        for r in stub.ModelStreamInfer(iter([req]), timeout=300):
            if r.error_message:
                errors.append(r.error_message)
                return
            raw = r.infer_response.raw_output_contents[0]
            out.extend(np.frombuffer(raw, dtype="<i8").tolist())
    except grpc.RpcError as e:
        errors.append((e.code(), e.details()))


def test_worker_loss_is_survived(tmp_path):
    save_hf(lm_model("llama"), tmp_path / "m")
    fleet = Fleet(tmp_path)
    try:
        fleet.add_worker(4)  # 3 stages + 1 spare
        fleet.load(tmp_path / "m", 3)
        prompts = [[1 + i, 2 + i % 7, 3, 4 + i % 5] for i in range(20)]
        undisturbed, errors = many_streams(fleet, prompts, lambda: None)
        assert not errors and all(len(o) == NEW for o in undisturbed)

        # 1. SIGKILL the stage-1 worker with 20 requests in flight; a spare takes over
        epoch = fleet.model().epoch
        victim = fleet.process_of_stage(1)
        t_kill = []
        outs, errors = many_streams(
            fleet, prompts, lambda: (t_kill.append(time.monotonic()), victim.kill())
        )
        assert not errors, errors[:3]
        assert outs == undisturbed  # every stream complete, no duplicate or missing token
        m = fleet.model()
        assert m.state == pb.MODEL_STATE_READY and m.epoch > epoch

        # 2. no spare left: kill another stage worker -> UNAVAILABLE fast, then a new worker
        #    joins and the model is ready again by itself
        fleet.process_of_stage(2).kill()
        fleet.wait(lambda st: fleet.model().state != pb.MODEL_STATE_READY, 30)
        t0 = time.monotonic()
        code, msg = _code(
            lambda: list(
                fleet.inference.Generate(
                    pb.GenerateRequest(
                        model="m", token_ids=pb.TokenIds(ids=[1, 2, 3]), max_new_tokens=4
                    ),
                    timeout=60,
                )
            )
        )
        assert code == grpc.StatusCode.UNAVAILABLE and time.monotonic() - t0 < 10, msg
        fleet.add_worker(may_serve=True)  # the model takes it at once, maybe before a poll
        fleet.wait(lambda st: fleet.model().state == pb.MODEL_STATE_READY, 120)
        out: list[int] = []
        fleet.stream(prompts[0], out, errors)
        assert out == undisturbed[0] and not errors

        # 3. a hung worker (SIGSTOP) is detected like a crash
        fleet.add_worker()  # a spare again
        hung = fleet.process_of_stage(0)
        outs, errors = many_streams(fleet, prompts[:8], lambda: hung.send_signal(signal.SIGSTOP))
        assert not errors, errors[:3]
        assert outs == undisturbed[:8]

        # 4. drain: the stage moves to a spare while requests run, none fails
        fleet.add_worker()
        st = fleet.admin.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)
        (w1,) = [w for w in st.workers if w.model == "m" and w.stage == 1 and w.state == "ready"]
        outs, errors = many_streams(
            fleet,
            prompts[:8],
            lambda: fleet.admin.DrainWorker(pb.DrainWorkerRequest(worker_id=w1.id), timeout=120),
        )
        assert not errors and outs == undisturbed[:8]
        # the drained worker is a spare now (idle, serving nothing)
        st = fleet.wait(lambda st: {w.id: w.state for w in st.workers}[w1.id] == "idle", 30)
        assert w1.id not in {w.id for w in st.workers if w.model == "m"}
        # lost workers no model needs are forgotten (no stale KV figures listed forever)
        fleet.wait(lambda st: all(w.state != "lost" for w in st.workers), 60)
    finally:
        fleet.close()


def test_kserve_stream_survives_a_worker_kill_with_request_id_and_metrics(tmp_path):
    """A KServe ModelStreamInfer stream (tritonclient's messages) rides through a SIGKILL of
    a stage worker token-identical, as pipeserve.v1 Generate does: the same relay gives it
    the caller's request id (initial metadata, coordinator and stage-0 worker logs), the
    per-model metrics, and a replay onto the re-formed pipeline."""
    import numpy as np
    from tritonclient.grpc import service_pb2 as kv2
    from tritonclient.grpc import service_pb2_grpc as kg

    model = lm_model("llama")
    save_hf(model, tmp_path / "m")
    metrics = _port()
    fleet = Fleet(tmp_path, "--metrics-port", str(metrics))
    try:
        fleet.add_worker(3)  # 2 stages + 1 spare
        fleet.load(tmp_path / "m", 2)
        fleet.wait(lambda st: sum(w.model == "m" and w.state == "ready" for w in st.workers) == 2)
        victim = fleet.process_of_stage(1)
        prompt, new = [3, 1, 4, 1, 5], 3 * NEW
        req = kv2.ModelInferRequest(model_name="m", id="k")
        req.inputs.add(name="input_ids", datatype="INT64", shape=[1, len(prompt)])
        req.raw_input_contents.append(np.asarray(prompt, dtype="<i8").tobytes())
        req.parameters["max_tokens"].int64_param = new
        req.parameters["ignore_eos"].bool_param = True
        stub = kg.GRPCInferenceServiceStub(grpc.insecure_channel(fleet.address))
        call = stub.ModelStreamInfer(
            iter([req]), timeout=300, metadata=(("x-request-id", "kserve-kill-1"),)
        )
        out: list[int] = []
        for r in call:
            assert not r.error_message, r.error_message
            out += np.frombuffer(r.infer_response.raw_output_contents[0], dtype="<i8").tolist()
            if len(out) == 4:
                victim.kill()  # mid-stream: stage 1 dies, its stage moves to the spare
        assert out == hf_greedy(model, prompt, new)  # token-identical through the kill
        assert ("x-request-id", "kserve-kill-1") in call.initial_metadata()
        fleet.wait(lambda st: fleet.model().state == pb.MODEL_STATE_READY)
        assert fleet.model().epoch > 1  # re-formed on the spare
        scraped = _scrape(metrics)
        ok = 'pipeserve_requests_total{method="ModelStreamInfer",model="m",status="OK"}'
        assert scraped[ok] == 1
        assert scraped['pipeserve_generated_tokens_total{model="m"}'] == new
        logs = {p.name: p.read_text() for p in tmp_path.glob("*.log")}
        coordinator = "".join(t for n, t in logs.items() if n.startswith("coordinator"))
        assert "[kserve-kill-1] generate on m: OK" in coordinator
        assert "[kserve-kill-1] replaying after" in coordinator
        # the stage-0 worker saw it twice: the first try, then the replay
        stage0 = [t for n, t in logs.items() if n.startswith("worker") and "[kserve-kill-1]" in t]
        admitted = r"\[kserve-kill-1\] request \d+ admitted"
        assert len(stage0) == 1 and len(re.findall(admitted, stage0[0])) == 2
    finally:
        fleet.close()


def test_coordinator_restart_restores_models(tmp_path):
    save_hf(lm_model("llama"), tmp_path / "m")
    fleet = Fleet(tmp_path, "--state-db", str(tmp_path / "state.db"))
    try:
        fleet.add_worker(2)
        fleet.load(tmp_path / "m", 2)
        before: list[int] = []
        errors: list = []
        fleet.stream([4, 5, 6], before, errors)
        fleet.coordinator.kill()  # SIGKILL: no clean shutdown
        fleet.coordinator.wait(timeout=30)
        fleet.start_coordinator()
        deadline = time.monotonic() + 60
        while fleet.model().state != pb.MODEL_STATE_READY:  # no reload by hand
            assert time.monotonic() < deadline, fleet.model()
            time.sleep(0.2)
        after: list[int] = []
        fleet.stream([4, 5, 6], after, errors)
        assert not errors and after == before and len(after) == NEW
    finally:
        fleet.close()


def test_drain_kill_stall_soak(tmp_path):
    """Cycles of drain, SIGKILL, a stall longer than the worker timeout with no spare (the
    stalled worker counts as lost, then heartbeats again) and workers rejoining, each under
    load: every stream token-identical, the model READY at the end, no worker left lost or
    draining.  Then a coordinator restart while a stage worker dies: the restored model is
    re-formed on the live workers plus a spare."""
    model = lm_model("llama")
    save_hf(model, tmp_path / "m")
    long = 3 * NEW  # the KServe stream: longer, so that it is mid-stream when a fault comes
    # a longer worker timeout than the other tests: on a busy 2-core machine a live worker's
    # heartbeat can be late by 2 s, and this test must tell a stall from load
    timeout = 6
    fleet = Fleet(tmp_path, "--state-db", str(tmp_path / "state.db"), "--worker-timeout", "6")
    try:
        fleet.add_worker(3)  # 2 stages + 1 spare
        fleet.load(tmp_path / "m", 2)
        prompts = [[1 + i, 2 + i % 7, 3, 4 + i % 5] for i in range(8)]
        undisturbed, errors = many_streams(fleet, prompts, lambda: None)
        assert not errors and all(len(o) == NEW for o in undisturbed)

        def ready() -> None:
            fleet.wait(lambda st: fleet.model().state == pb.MODEL_STATE_READY, 120)

        kserve_ref = hf_greedy(model, prompts[0], long)

        def check(fault) -> None:
            kserve: list[int] = []  # a KServe stream rides through the fault as well
            args = (fleet, prompts[0], kserve, errors, long)
            t = threading.Thread(target=_kserve_stream, args=args)
            t.start()
            deadline = time.monotonic() + 60
            while not kserve and not errors and time.monotonic() < deadline:
                time.sleep(0.01)  # under way before the fault
            outs, errs = many_streams(fleet, prompts, fault)
            t.join(300)
            assert not errs and not errors, (errs + errors)[:3]
            assert outs == undisturbed and kserve == kserve_ref
            ready()

        for cycle in range(SOAK_CYCLES):
            st = fleet.admin.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)
            (w1,) = [w for w in st.workers if w.model == "m" and w.stage == 1]
            check(lambda w=w1: fleet.admin.DrainWorker(pb.DrainWorkerRequest(worker_id=w.id)))
            check(lambda k=cycle % 2: fleet.process_of_stage(k).kill())  # the drained: spare
            # no spare now: a stage worker stalls past the timeout, then resumes; the model
            # comes back on the same workers by itself
            stalled = fleet.process_of_stage(1)
            stalled.send_signal(signal.SIGSTOP)
            fleet.wait(lambda st: fleet.model().state != pb.MODEL_STATE_READY, 3 * timeout)
            time.sleep(1)
            stalled.send_signal(signal.SIGCONT)
            ready()
            out: list[int] = []
            fleet.stream(prompts[0], out, errors)
            assert out == undisturbed[0] and not errors
            fleet.add_worker()  # a spare again
        st = fleet.wait(lambda st: all(w.state in ("idle", "ready") for w in st.workers), 60)
        assert sum(w.model == "m" for w in st.workers) == 2

        # restart the coordinator; a stage worker dies while it is down
        victim = fleet.process_of_stage(0)
        fleet.coordinator.kill()
        fleet.coordinator.wait(timeout=30)
        victim.kill()
        fleet.start_coordinator()
        ready()
        out = []
        fleet.stream(prompts[1], out, errors)
        assert out == undisturbed[1] and not errors
    finally:
        fleet.close()
