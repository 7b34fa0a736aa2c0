"""The OpenAI gateway end to end, with the official ``openai`` client: ``pipeserve local
CKPT --stages 2 --http-port N`` starts a coordinator, 2 stage workers and the gateway as
separate processes (a client token required); completions and chat, plain and streamed,
must give the text the ``pipeserve.v1`` gRPC path gives for the same prompt.  The stop-string
matcher and request checks also have unit tests (no cluster)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx2 as httpx  # the HTTP client the openai package ships with
import openai
import pytest
import torch

from pipeserve.gateway.errors import ApiError
from pipeserve.gateway.requests import parse_params
from pipeserve.gateway.stops import StopMatcher
from pipeserve.v1 import pipeserve_pb2 as pb
from pipeserve.v1 import pipeserve_pb2_grpc as pbg

from .models import HF_CONFIGS, hf_greedy

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "sk-pipeserve-test"
VOCAB = 320  # byte-level BPE: 256 bytes + specials + a few merges
PROMPT = "Hello world, the pipeline streams tokens"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
CONTEXT = 100_000  # positions; the workers' KV budget is 65536 tokens


# ---------------------------------------------------------------------------- unit tests
def _feed(stops: list[str], deltas: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = "".join(m.push(d) for d in deltas)
    return out + m.flush(), m.stopped


def test_stop_matcher_spans_deltas_and_drops_the_stop_text():
    assert _feed(["END"], ["abc E", "N", "D tail"]) == ("abc ", True)
    assert _feed(["\n\n", "xyz"], ["a\n", "\nb"]) == ("a", True)
    assert _feed(["xyz"], ["ab", "xy", "q"]) == ("abxyq", False)  # held "xy", then released
    assert _feed(["aab"], ["a", "a", "a", "b"]) == ("a", True)  # overlapping prefixes
    assert _feed(["b", "abc"], ["xab", "c"]) == ("xa", True)  # the earliest match wins
    m = StopMatcher(["STOP"])
    assert m.push("ok ST") == "ok "  # "ST" may begin the stop string: held back
    assert m.push("ar") == "STar"


def test_request_checks_refuse_what_the_engine_cannot_do():
    ok = parse_params({"model": "m", "stop": "x", "seed": 2**64 - 1, "n": 2}, chat=False)
    assert (ok.stop, ok.seed, ok.n, ok.temperature) == (["x"], 2**64 - 1, 2, 1.0)
    for body, param in [
        ({"model": "m", "logprobs": 2}, "logprobs"),
        ({"model": "m", "echo": True}, "echo"),
        ({"model": "m", "best_of": 3}, "best_of"),
        ({"model": "m", "presence_penalty": 0.5}, "presence_penalty"),
        ({"model": "m", "temperature": -1}, "temperature"),
        ({"model": "m", "seed": -1}, "seed"),
        ({"model": "m", "stop": [""]}, "stop"),
        ({"model": "m", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "x"}, "model"),
    ]:
        with pytest.raises(ApiError) as e:
            parse_params(body, chat=False)
        assert (e.value.status, e.value.param) == (400, param), body
        assert e.value.body()["error"]["message"]


# ---------------------------------------------------------------------------- the cluster
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoint(path: Path):
    """A tiny Llama (weights redrawn at std 1 so greedy text does not repeat one token) with
    the demo's byte-level tokenizer and chat template."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeserve.demo_tokenizer import save_demo_tokenizer

    cfg = {k: v for k, v in HF_CONFIGS["llama"].items() if k != "model_type"}
    # a long context, so a request can fit the context and still not the KV budget (429)
    config = AutoConfig.for_model(
        "llama", **{**cfg, "vocab_size": VOCAB, "max_position_embeddings": CONTEXT}
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen))
    model.save_pretrained(path, max_shard_size="40KB")
    return model, save_demo_tokenizer(path, VOCAB)


class Local:
    """``pipeserve local CKPT --stages 2 --http-port N`` as a subprocess."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.model, self.tok = _checkpoint(tmp / "tiny")
        self.name = "tiny"
        self.http = _port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PIPESERVE_CLIENT_TOKEN": TOKEN}
        self.out = open(tmp / "local.out", "w+")  # noqa: SIM115 -- closed in close()
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "pipeserve", "local", str(tmp / "tiny")),
                *("--stages", "2", "--port", "0", "--http-port", str(self.http)),
            ],
            stdout=self.out,
            stderr=subprocess.STDOUT,
            cwd=tmp,
            env=env,
        )
        deadline = time.monotonic() + 600
        while "serving; Ctrl-C" not in (text := (tmp / "local.out").read_text()):
            assert self.proc.poll() is None and time.monotonic() < deadline, text
            time.sleep(0.5)
        self.stdout = text
        self.address = re.search(r"coordinator (127\.0\.0\.1:\d+)", text).group(1)
        self.url = f"http://127.0.0.1:{self.http}/v1"
        self.channel = grpc.insecure_channel(self.address)
        self.inference = pbg.InferenceStub(self.channel)
        self.admin = pbg.AdminStub(self.channel)

    def client(self, key: str = TOKEN, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, **kw)

    def grpc_text(self, req: pb.GenerateRequest) -> tuple[str, list[tuple[int, str]], pb.Usage]:
        """Text, (tokens, text) per response and usage of the gRPC path."""
        parts, usage = [], None
        for r in self.inference.Generate(req, metadata=AUTH, timeout=120):
            parts.append((len(r.token_ids), r.text))
            if r.finish_reason:
                usage = r.usage
        return "".join(t for _, t in parts), parts, usage

    def kv_sequences(self) -> list[int]:
        st = self.admin.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)
        return [w.kv_sequences for w in st.workers]

    def close(self) -> None:
        self.proc.send_signal(2)  # Ctrl-C: run_local stops its children
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.out.close()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    c = Local(tmp_path_factory.mktemp("gateway"))
    try:
        yield c
    finally:
        c.close()


def _req(ids: list[int] | None = None, text: str | None = None, new: int = 24, **s):
    req = pb.GenerateRequest(model="tiny", max_new_tokens=new)
    if text is not None:
        req.text = text
    else:
        req.token_ids.ids.extend(ids)
    req.sampling.CopyFrom(pb.SamplingParameters(**s))
    return req


@pytest.mark.slow
def test_local_prints_how_to_call_and_lists_ready_models(local):
    assert "same tokens as single-process" in local.stdout
    assert f"OpenAI-compatible API: {local.url}" in local.stdout
    assert f"curl {local.url.removesuffix('/v1')}/v1/chat/completions" in local.stdout
    assert [m.id for m in local.client().models.list().data] == ["tiny"]


@pytest.mark.slow
def test_completions_plain_and_streamed_equal_the_grpc_path(local):
    want, _, usage = local.grpc_text(_req(text=PROMPT, ignore_eos=True))
    ids = local.tok(PROMPT)["input_ids"]  # what the worker made of the text
    got_ids = [
        t
        for r in local.inference.Generate(_req(ids, ignore_eos=True), metadata=AUTH)
        for t in r.token_ids
    ]
    assert got_ids == hf_greedy(local.model, ids, 24)  # the gRPC path is generate's
    assert want.strip() and usage.completion_tokens == 24

    c = local.client()
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    r = c.completions.create(**kw, extra_body={"ignore_eos": True})
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 24)
    assert r.usage.total_tokens == len(ids) + 24

    chunks = list(
        c.completions.create(
            **kw,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
    assert len([ch for ch in chunks if ch.choices]) > 5  # streamed, not one blob
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24

    # token-id prompts, and several prompts in one request: one choice each, in order
    r = c.completions.create(
        model="tiny",
        prompt=[ids, PROMPT],
        max_tokens=24,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert [ch.text for ch in r.choices] == [want, want]
    assert r.usage.prompt_tokens == 2 * len(ids)


@pytest.mark.slow
def test_chat_plain_and_streamed_equal_the_grpc_path(local):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say something about the pipeline"},
    ]
    text = local.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|assistant|>\n")
    ids = local.tok(text, add_special_tokens=False)["input_ids"]
    want, _, _ = local.grpc_text(_req(ids, new=20, ignore_eos=True))

    c = local.client()
    kw = dict(
        model="tiny",
        messages=messages,
        max_tokens=20,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    r = c.chat.completions.create(**kw)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 20)

    chunks = list(c.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


@pytest.mark.slow
def test_stop_strings_across_token_boundaries_and_stop_ids(local):
    ids = local.tok(PROMPT)["input_ids"]
    full, parts, _ = local.grpc_text(_req(ids, new=40, ignore_eos=True))
    # a stop string made of the end of one streamed piece and the start of the next
    k = next(i for i in range(3, len(parts) - 1) if parts[i][1] and parts[i + 1][1])
    stop = parts[k][1][-1:] + parts[k + 1][1][:2]
    cut = full.find(stop)
    seen, tokens_needed = "", 0
    for n, t in parts:
        seen, tokens_needed = seen + t, tokens_needed + n
        if stop in seen:
            break
    c = local.client()
    kw = dict(
        model="tiny",
        prompt=PROMPT,
        max_tokens=40,
        temperature=0,
        stop=[stop, "\x00\x01"],
        extra_body={"ignore_eos": True},
    )
    r = c.completions.create(**kw)
    assert r.choices[0].text == full[:cut]  # the stop string is not returned
    assert r.choices[0].finish_reason == "stop"
    # tokens generated up to the stop (a stream message can carry 2 tokens under load)
    assert tokens_needed <= r.usage.completion_tokens <= tokens_needed + 2
    streamed = list(c.completions.create(**kw, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == full[:cut]
    assert streamed[-1].choices[0].finish_reason == "stop"

    # a stop token id (the engine's stop_token_ids): its id is the last one generated
    tokens = [
        t
        for r in local.inference.Generate(_req(ids, new=40, ignore_eos=True), metadata=AUTH)
        for t in r.token_ids
    ]
    stop_id = tokens[6]
    r = c.completions.create(
        model="tiny",
        prompt=ids,
        max_tokens=40,
        temperature=0,
        extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]},
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == tokens.index(stop_id) + 1


@pytest.mark.slow
def test_seeds_reproduce_and_n_choices_use_consecutive_seeds(local):
    c = local.client()
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.95)
    a = c.completions.create(**kw, seed=7).choices[0].text
    assert c.completions.create(**kw, seed=7).choices[0].text == a
    b = c.completions.create(**kw, seed=8).choices[0].text
    assert a != b
    both = c.completions.create(**kw, seed=7, n=2)
    assert [ch.text for ch in both.choices] == [a, b]  # choice j samples with seed + j
    # the gRPC path with the same seed samples the same text
    want, _, _ = local.grpc_text(_req(text=PROMPT, new=16, temperature=1.0, top_p=0.95, seed=7))
    assert a == want


@pytest.mark.slow
def test_errors_are_openai_error_objects_with_http_status(local):
    c = local.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    assert "nope" in e.value.message and "tiny" in e.value.message
    with pytest.raises(openai.PermissionDeniedError):  # wrong client token: 403
        local.client(key="wrong").completions.create(model="tiny", prompt="x", max_tokens=2)
    r = httpx.post(f"{local.url}/completions", json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 401 and "authorization" in r.json()["error"]["message"]
    for kw, what in [
        (dict(logprobs=2), "log-probabilities"),
        (dict(echo=True), "echo"),
        (dict(temperature=-1.0), "temperature"),
        (dict(max_tokens=CONTEXT), "context"),  # past the model's positions: the engine says
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny", prompt="x", **{"max_tokens": 2, **kw})
        assert what in e.value.message, e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # chat with a list of non-text parts
        c.chat.completions.create(
            model="tiny",
            max_tokens=2,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        )
    with pytest.raises(openai.RateLimitError) as e:  # fits the context, not the KV budget
        c.completions.create(model="tiny", prompt="x", max_tokens=70_000)
    assert "KV budget" in e.value.message
    r = httpx.post(f"{local.url}/completions", content=b"{not json", headers=dict([AUTH[0]]))
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"

    # 504: a gateway whose deadline is shorter than the generation
    port = _port()
    gw = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeserve",
            "gateway",
            "--coordinator",
            local.address,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--request-timeout",
            "0.3",
        ],
        cwd=ROOT,
    )
    try:
        _wait_ready(port)
        slow = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN, max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            slow.completions.create(
                model="tiny", prompt="x", max_tokens=1500, extra_body={"ignore_eos": True}
            )
        assert e.value.status_code == 504 and "DEADLINE_EXCEEDED" in e.value.message
        _wait_kv_free(local)  # the expired request is cancelled on every stage
    finally:
        gw.terminate()
        gw.wait(timeout=30)
    # 503: a gateway whose coordinator is not there
    port = _port()
    gw = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeserve",
            "gateway",
            "--coordinator",
            f"127.0.0.1:{_port()}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=ROOT,
    )
    try:
        _wait_ready(port, want=503)
        with pytest.raises(openai.APIStatusError) as e:
            openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN, max_retries=0
            ).models.list()
        assert e.value.status_code == 503 and "UNAVAILABLE" in e.value.message
    finally:
        gw.terminate()
        gw.wait(timeout=30)


def _wait_ready(port: int, want: int = 200) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == want:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.3)


@pytest.mark.slow
def test_request_id_in_and_out_joins_the_grpc_request_id(local):
    headers = {"authorization": f"Bearer {TOKEN}", "x-request-id": "gw-req-4711"}
    r = httpx.post(
        f"{local.url}/completions",
        headers=headers,
        json={"model": "tiny", "prompt": PROMPT, "max_tokens": 3},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "gw-req-4711"
    assert r.json()["id"] == "cmpl-gw-req-4711"
    logs = local.tmp / ".pipeserve-cache" / "logs"
    assert "[gw-req-4711] generate on tiny: OK" in (logs / "coordinator.log").read_text()
    assert "[gw-req-4711] request" in (logs / "worker0.log").read_text()
    r = httpx.post(
        f"{local.url}/completions",
        headers=dict([AUTH[0]]),
        json={"model": "tiny", "prompt": PROMPT, "max_tokens": 1},
        timeout=60,
    )
    assert len(r.headers["x-request-id"]) == 16  # a fresh one when the client sends none


@pytest.mark.slow
def test_disconnect_mid_stream_frees_kv_on_every_stage(local):
    _wait_kv_free(local)
    body = {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": 1900,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
    }
    headers = dict([AUTH[0]])
    with (
        httpx.Client(timeout=60) as h,
        h.stream("POST", f"{local.url}/completions", json=body, headers=headers) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(8)]
        assert any(x.startswith("data: {") for x in got)
        deadline = time.monotonic() + 30
        while local.kv_sequences() != [1, 1]:  # heartbeats carry the stages' KV figures
            assert time.monotonic() < deadline
            time.sleep(0.2)
    # the client is gone after a few of 1900 tokens: every stage drops the request's cache
    _wait_kv_free(local)
    st = local.admin.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)
    assert all(w.kv_bytes == 0 for w in st.workers)
    metrics = httpx.get(f"{local.url.removesuffix('/v1')}/metrics").text
    assert re.search(
        r'pipeserve_gateway_client_disconnects_total\{endpoint="completions"\} [1-9]', metrics
    )


@pytest.mark.slow
def test_200_concurrent_streams_complete_with_their_text(local):
    prompts = [f"{PROMPT} {i}" for i in range(4)]
    c = local.client()
    want = [
        c.completions.create(
            model="tiny", prompt=p, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
        for p in prompts
    ]
    messages = [{"role": "user", "content": "Hi"}]
    want_chat = (
        c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        .choices[0]
        .message.content
    )

    async def one(ac: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        if i % 2:
            s = await ac.chat.completions.create(
                model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True
            )
            parts = [ch async for ch in s]
            return (
                "".join(ch.choices[0].delta.content or "" for ch in parts),
                parts[-1].choices[0].finish_reason,
            )
        s = await ac.completions.create(
            model="tiny",
            prompt=prompts[i % 4],
            max_tokens=8,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        parts = [ch async for ch in s]
        return "".join(ch.choices[0].text for ch in parts), parts[-1].choices[0].finish_reason

    async def run() -> list:
        ac = openai.AsyncOpenAI(base_url=local.url, api_key=TOKEN, max_retries=0, timeout=300)
        async with ac:
            return await asyncio.gather(*(one(ac, i) for i in range(200)))

    t0 = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - t0
    for i, (text, finish) in enumerate(results):
        assert text == (want_chat if i % 2 else want[i % 4]), i
        assert finish in ("stop", "length")
    print(f"200 concurrent HTTP streams: {elapsed:.1f} s")
    _wait_kv_free(local)


def _wait_kv_free(local: Local, timeout: float = 30) -> None:
    """Until no stage holds a KV cache row (heartbeats report them every 0.5 s)."""
    deadline = time.monotonic() + timeout
    while (kv := local.kv_sequences()) != [0, 0]:
        assert time.monotonic() < deadline, kv
        time.sleep(0.2)


@pytest.mark.slow
def test_gateway_metrics(local):
    local.client().completions.create(model="tiny", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        local.client().completions.create(model="nope", prompt="x", max_tokens=2)
    text = httpx.get(f"{local.url.removesuffix('/v1')}/metrics").text
    assert re.search(
        r'pipeserve_gateway_requests_total\{endpoint="completions",status="200"\} [1-9]', text
    )
    assert re.search(
        r'pipeserve_gateway_requests_total\{endpoint="completions",status="404"\}', text
    )
    assert re.search(r"pipeserve_gateway_completion_tokens_total\{[^}]*\} [1-9]", text)
    assert "pipeserve_gateway_time_to_first_byte_seconds_bucket" in text


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_k8s_gateway_manifests_match_the_code(overlay):
    """The gateway Deployment's flags parse, its ports, probes and NetworkPolicy agree with
    the code, it reaches the coordinator's Service, and it mounts the models read-only (for
    tokenizers) and the TLS Secret where the env vars point."""
    sys.path.insert(0, str(ROOT / "deploy"))
    from render import render

    from pipeserve.cli import build_parser
    from pipeserve.gateway import Backend, create_app

    docs = render(ROOT / "deploy" / "k8s" / "overlays" / overlay)

    def one(kind: str, name: str) -> dict:
        (d,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
        return d

    dep = one("Deployment", "pipeserve-gateway")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(c["args"])
    assert args.cmd == "gateway"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": args.port}
    coord = one("Service", "pipeserve-coordinator")
    assert args.coordinator == f"{coord['metadata']['name']}:{coord['spec']['ports'][0]['port']}"
    svc = one("Service", "pipeserve-gateway")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(args.port, "http")]
    paths = {r.path for r in create_app(Backend("127.0.0.1:1")).routes}
    assert {c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]} <= paths
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in paths
    assert int(annotations["prometheus.io/port"]) == args.port
    policy = one("NetworkPolicy", "pipeserve-gateway")
    assert policy["spec"]["podSelector"] == dep["spec"]["selector"]
    assert [p["port"] for r in policy["spec"]["ingress"] for p in r["ports"]] == [args.port]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["models"]["readOnly"] is True and mounts["models"]["mountPath"] == "/models"
    env = {e["name"]: e.get("value") for e in c["env"]}
    for var in ("PIPESERVE_TLS_CA", "PIPESERVE_TLS_CERT", "PIPESERVE_TLS_KEY"):
        assert env[var].startswith(mounts["tls"]["mountPath"] + "/"), var
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})


@pytest.mark.slow
def test_tls_to_the_coordinator(tmp_path):
    """A coordinator under mutual TLS: the gateway with the CA and a client certificate
    lists its models; without a client certificate, or in plaintext, it cannot (503)."""
    from pipeserve.certs import make_certs

    certs = make_certs(tmp_path / "certs")
    port = _port()
    tls = ["--tls-ca", str(certs / "ca.pem")]
    client = [*tls, "--tls-cert", str(certs / "client.pem"), "--tls-key", str(certs / "client.key")]
    server = [*tls, "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key")]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeserve",
                "coordinator",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *server,
            ],
            cwd=ROOT,
        )
    ]
    try:
        urls = []
        for flags in (client, tls, []):  # mTLS, TLS without a client certificate, plaintext
            http = _port()
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "pipeserve",
                        "gateway",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(http),
                        "--coordinator",
                        f"127.0.0.1:{port}",
                        *flags,
                    ],
                    cwd=ROOT,
                )
            )
            urls.append(f"http://127.0.0.1:{http}")
        _wait_ready(int(urls[0].rsplit(":", 1)[1]))
        r = httpx.get(f"{urls[0]}/v1/models", timeout=30)
        assert r.status_code == 200 and r.json() == {"object": "list", "data": []}
        for url in urls[1:]:
            _wait_ready(int(url.rsplit(":", 1)[1]), want=503)
            r = httpx.get(f"{url}/v1/models", timeout=30)
            assert r.status_code == 503 and "UNAVAILABLE" in r.json()["error"]["message"]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
