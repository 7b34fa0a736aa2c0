"""A hostile caller against a live cluster (a coordinator and 2 stage workers as processes):
a worker's port serves nobody but its coordinator, bad requests are refused at once with a
real status code and a bounded message, a huge text prompt is refused before it is
tokenized -- and the model keeps serving exactly the tokens `transformers` gives."""

from __future__ import annotations

import statistics
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pipeserve.v1 import pipeserve_pb2 as pb
from pipeserve.v1 import pipeserve_pb2_grpc as pbg

from .cluster import Cluster
from .cluster import code as _code
from .cluster import greedy as _greedy
from .models import lm_model, save_hf, save_word_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hardening")
    model = lm_model("llama")
    save_hf(model, tmp / "m")
    save_word_tokenizer(tmp / "m")
    c = Cluster(tmp, workers=[[], []])
    c.small, c.ckpt = model, tmp
    try:
        req = pb.LoadModelRequest(
            name="m", checkpoint=str(tmp / "m"), policy=pb.SplitPolicy(equal_size=2)
        )
        list(c.admin.LoadModel(req, timeout=300))
        yield c
    finally:
        c.close()


def _ready(cluster) -> None:
    (m,) = cluster.inference.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert m.state == pb.MODEL_STATE_READY, m
    assert cluster.generate("m", [3, 4, 5], 8) == _greedy(cluster.small, [3, 4, 5], 8)


def test_worker_ports_refuse_everyone_but_the_coordinator(cluster):
    gen = pb.GenerateRequest(model="m", token_ids=pb.TokenIds(ids=[5, 17, 20]), max_new_tokens=3)
    calls = {
        "Generate": lambda s, md: list(s.Generate(gen, timeout=10, metadata=md)),
        "Release": lambda s, md: s.Release(
            pb.ReleaseRequest(model="m", abandon=True), timeout=10, metadata=md
        ),
        "Status": lambda s, md: s.Status(pb.StatusRequest(), timeout=10, metadata=md),
        "Assign": lambda s, md: s.Assign(pb.AssignRequest(model="x"), timeout=10, metadata=md),
        "Timeline": lambda s, md: s.Timeline(pb.TimelineRequest(), timeout=10, metadata=md),
        "Forward": lambda s, md: s.Forward(pb.ForwardRequest(), timeout=10, metadata=md),
        "Profile": lambda s, md: s.Profile(pb.ProfileRequest(), timeout=10, metadata=md),
    }
    wrong = (("authorization", "Bearer guess"),)
    for w in cluster.status().workers:
        stub = pbg.StageWorkerStub(grpc.insecure_channel(w.address))
        for name, call in calls.items():
            code, msg = _code(lambda call=call, stub=stub: call(stub, None))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (name, code, msg)
            code, _ = _code(lambda call=call, stub=stub: call(stub, wrong))
            assert code == grpc.StatusCode.PERMISSION_DENIED, (name, code)
        # probes still work without a token
        h = health_pb2_grpc.HealthStub(grpc.insecure_channel(w.address))
        r = h.Check(health_pb2.HealthCheckRequest(service="pipeserve.v1.StageWorker"), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    _ready(cluster)  # nothing was released


def test_invalid_generate_is_refused_at_once(cluster):
    def req(**kw) -> pb.GenerateRequest:
        base = {"model": "m", "token_ids": pb.TokenIds(ids=[1, 2, 3]), "max_new_tokens": 4}
        return pb.GenerateRequest(**{**base, **kw})

    bad = [
        req(sampling=pb.SamplingParameters(temperature=float("nan"))),
        req(token_ids=pb.TokenIds(ids=[])),
        req(text=""),
        req(max_new_tokens=-5),
        req(sampling=pb.SamplingParameters(top_p=1.5)),
        req(token_ids=pb.TokenIds(ids=[1, -2])),
        req(token_ids=pb.TokenIds(ids=[10**9])),  # outside the vocabulary: the worker says so
        req(max_new_tokens=10**9),  # past the context: the worker says so
    ]
    for r in bad:
        times = []
        for _ in range(5):
            t0 = time.monotonic()
            code, msg = _code(lambda r=r: list(cluster.inference.Generate(r, timeout=30)))
            times.append(time.monotonic() - t0)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (r, code, msg)
        assert statistics.median(times) < 0.05 and max(times) < 1.0, (r, times)
    code, _ = _code(lambda: list(cluster.inference.Generate(req(model="nope"), timeout=30)))
    assert code == grpc.StatusCode.NOT_FOUND
    _ready(cluster)


def test_huge_text_prompt_is_refused_before_tokenizing(cluster):
    text = "w1 w2 w3 " * (20 * 2**20 // 9)  # 20 MB of words the tokenizer knows
    t0 = time.monotonic()
    code, msg = _code(
        lambda: list(
            cluster.inference.Generate(
                pb.GenerateRequest(model="m", text=text, max_new_tokens=2), timeout=60
            )
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in msg, (code, msg)
    assert time.monotonic() - t0 < 5, "a 20 MB text must not be tokenized to be refused"
    got = cluster.generate("m", [3, 4, 5], 4)  # and a short text still works
    assert got == _greedy(cluster.small, [3, 4, 5], 4)
    out = list(
        cluster.inference.Generate(
            pb.GenerateRequest(model="m", text="w3 w4 w5", max_new_tokens=4), timeout=60
        )
    )
    assert [t for r in out for t in r.token_ids] == got


def test_bad_admin_input_gets_real_codes_and_bounded_echoes(cluster):
    admin = cluster.admin
    nul = str(cluster.ckpt / "m") + "\x00x"
    code, msg = _code(lambda: admin.PlanModel(pb.PlanModelRequest(checkpoint=nul), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "NUL" in msg, (code, msg)
    code, msg = _code(
        lambda: list(admin.LoadModel(pb.LoadModelRequest(name="z", checkpoint=nul), timeout=30))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, msg)
    huge = "n" * 2**20  # a 1 MB model name: NOT_FOUND with a short message
    code, msg = _code(
        lambda: list(
            cluster.inference.Generate(
                pb.GenerateRequest(model=huge, token_ids=pb.TokenIds(ids=[1])), timeout=30
            )
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND and len(msg) < 500, (code, len(msg))
    code, msg = _code(
        lambda: list(
            admin.LoadModel(
                pb.LoadModelRequest(name=huge, checkpoint=str(cluster.ckpt / "m")), timeout=30
            )
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(msg) < 500, (code, len(msg))
    code, msg = _code(lambda: admin.DrainWorker(pb.DrainWorkerRequest(worker_id=huge), timeout=30))
    assert code == grpc.StatusCode.NOT_FOUND and len(msg) < 500, (code, len(msg))
    # health of an unknown model: NOT_FOUND that says what exists
    h = health_pb2_grpc.HealthStub(cluster.channel)
    code, msg = _code(
        lambda: h.Check(health_pb2.HealthCheckRequest(service="pipeserve.model.nope"), timeout=10)
    )
    assert code == grpc.StatusCode.NOT_FOUND and "pipeserve.model.m" in msg, msg
    _ready(cluster)


def test_kserve_tensors_exact_and_config(cluster):
    import numpy as np
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(cluster.address)
    meta = client.get_model_metadata("m")
    shapes = {t.name: list(t.shape) for t in meta.inputs}
    assert shapes == {"text_input": [1], "input_ids": [1, -1]}
    config = client.get_model_config("m").config  # was UNIMPLEMENTED
    assert {i.name: list(i.dims) for i in config.input} == shapes
    assert config.max_batch_size == 0

    ref = _greedy(cluster.small, [3, 4, 5], 6)
    inp = tc.InferInput("input_ids", [1, 3], "INT64")  # the shape the metadata gives
    inp.set_data_from_numpy(np.array([[3, 4, 5]], dtype=np.int64))
    res = client.infer("m", [inp], parameters={"max_tokens": 6})
    assert res.as_numpy("output_ids").tolist() == [ref]  # [1, m] as the input was

    def refused(name: str, shape: list[int], dtype: str, raw: bytes) -> str:
        from tritonclient.grpc import service_pb2 as kv2
        from tritonclient.grpc import service_pb2_grpc as kg

        req = kv2.ModelInferRequest(model_name="m")
        req.inputs.add(name=name, datatype=dtype, shape=shape)
        req.raw_input_contents.append(raw)
        stub = kg.GRPCInferenceServiceStub(cluster.channel)
        t0 = time.monotonic()
        code, msg = _code(lambda: stub.ModelInfer(req, timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and time.monotonic() - t0 < 1, (code, msg)
        return msg

    ids = np.arange(1, 7, dtype="<i8").tobytes()
    assert "batch of 2" in refused("input_ids", [2, 3], "INT64", ids)  # not merged
    assert "bytes" in refused("input_ids", [2**40], "INT64", ids[:24])
    assert "runs past" in refused("text_input", [1], "BYTES", b"\x00\x00\x00\x80abc")
    assert "empty" in refused("input_ids", [1, 0], "INT64", b"")  # validated first
    _ready(cluster)


def test_admin_status_into_a_closed_pipe(cluster):
    """`pipeserve admin status | head` ends quietly, without a BrokenPipeError traceback."""
    import subprocess
    import sys

    from .cluster import ROOT

    cmd = (
        f"{sys.executable} -m pipeserve admin status --watch 0.05 --coordinator "
        f"{cluster.address} | head -1"
    )
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.stdout and "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out


HOSTILE_CALLS = 1500
"""In CI; ``bench/bench_hostile.py`` makes 10,000+."""


def test_hostile_calls_on_every_rpc(cluster):
    """Random and abusive bodies on every RPC of the coordinator and the workers: no
    UNKNOWN, no INTERNAL for a well-formed message, nobody dies, the coordinator's memory and
    log stay bounded, and good requests running meanwhile get exactly their tokens."""
    from .hostile import siege

    r = siege(cluster, HOSTILE_CALLS)
    assert r["calls"] == HOSTILE_CALLS, r
    assert not r["forbidden"], r["forbidden"][:10]
    assert r["alive"] and r["model_ready"], r
    assert r["good"] and r["good_identical"] == r["good"], r["good_other"]
    before, after = r["coordinator_rss_mb"]
    assert after - before < 200, r  # the store and the worker list are bounded
    assert r["log_bytes_per_call"] < 400, r  # one line per bad call, no tracebacks
    print("hostile calls:", {k: v for k, v in r.items() if k != "forbidden"})
