"""The OpenAI gateway end to end, with the official ``openai`` client: ``pipeserve local
CKPT --stages 2 --http-port N`` starts a coordinator, 2 stage workers and the gateway as
separate processes (a client token required); completions and chat, plain and streamed,
must give the text the ``pipeserve.v1`` gRPC path gives for the same prompt."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time

import httpx2 as httpx  # the HTTP client the openai package ships with
import openai
import pytest

from pipeserve.v1 import pipeserve_pb2 as pb

from .gateway_local import (
    AUTH,
    CONTEXT,
    PROMPT,
    ROOT,
    TOKEN,
    Local,
    free_port,
    grpc_request,
    wait_kv_free,
    wait_ready,
)
from .models import hf_greedy


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    c = Local(tmp_path_factory.mktemp("gateway"))
    try:
        yield c
    finally:
        c.close()


@pytest.mark.slow
def test_local_prints_how_to_call_and_lists_ready_models(local):
    assert "same tokens as single-process" in local.stdout
    assert f"OpenAI-compatible API: {local.url}" in local.stdout
    assert f"curl {local.url.removesuffix('/v1')}/v1/chat/completions" in local.stdout
    assert [m.id for m in local.client().models.list().data] == ["tiny"]


@pytest.mark.slow
def test_completions_plain_and_streamed_equal_the_grpc_path(local):
    want, _, usage = local.grpc_text(grpc_request(text=PROMPT, ignore_eos=True))
    ids = local.tok(PROMPT)["input_ids"]  # what the worker made of the text
    got_ids = [
        t
        for r in local.inference.Generate(grpc_request(ids, ignore_eos=True), metadata=AUTH)
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
    want, _, _ = local.grpc_text(grpc_request(ids, new=20, ignore_eos=True))

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
    full, parts, _ = local.grpc_text(grpc_request(ids, new=40, ignore_eos=True))
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
    streamed = list(
        c.completions.create(**kw, stream=True, extra_headers={"x-request-id": "stop-str-1"})
    )
    assert "".join(ch.choices[0].text for ch in streamed) == full[:cut]
    assert streamed[-1].choices[0].finish_reason == "stop"
    # the stop string ended the request on the cluster too (not run on to max_tokens)
    log = local.tmp / ".pipeserve-cache" / "logs" / "coordinator.log"
    deadline = time.monotonic() + 30
    while "[stop-str-1] generate on tiny: CANCELLED" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)

    # a stop token id (the engine's stop_token_ids): its id is the last one generated
    tokens = [
        t
        for r in local.inference.Generate(grpc_request(ids, new=40, ignore_eos=True), metadata=AUTH)
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
    want, _, _ = local.grpc_text(
        grpc_request(text=PROMPT, new=16, temperature=1.0, top_p=0.95, seed=7)
    )
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
    port = free_port()
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
        wait_ready(port)
        slow = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN, max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            slow.completions.create(
                model="tiny", prompt="x", max_tokens=1500, extra_body={"ignore_eos": True}
            )
        assert e.value.status_code == 504 and "DEADLINE_EXCEEDED" in e.value.message
        wait_kv_free(local)  # the expired request is cancelled on every stage
    finally:
        gw.terminate()
        gw.wait(timeout=30)
    # 503: a gateway whose coordinator is not there
    port = free_port()
    gw = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeserve",
            "gateway",
            "--coordinator",
            f"127.0.0.1:{free_port()}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=ROOT,
    )
    try:
        wait_ready(port, want=503)
        with pytest.raises(openai.APIStatusError) as e:
            openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN, max_retries=0
            ).models.list()
        assert e.value.status_code == 503 and "UNAVAILABLE" in e.value.message
    finally:
        gw.terminate()
        gw.wait(timeout=30)


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
    # the stage-0 worker logs it: whichever registered first, not necessarily worker0
    workers = [p.read_text() for p in sorted(logs.glob("worker*.log"))]
    assert sum("[gw-req-4711] request" in text for text in workers) == 1
    r = httpx.post(
        f"{local.url}/completions",
        headers=dict([AUTH[0]]),
        json={"model": "tiny", "prompt": PROMPT, "max_tokens": 1},
        timeout=60,
    )
    assert len(r.headers["x-request-id"]) == 16  # a fresh one when the client sends none


@pytest.mark.slow
def test_disconnect_mid_stream_frees_kv_on_every_stage(local):
    wait_kv_free(local)
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
    wait_kv_free(local)
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
    wait_kv_free(local)


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
