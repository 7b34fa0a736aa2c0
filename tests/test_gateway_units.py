"""The gateway's pure parts: stop strings across stream deltas, request checks."""

from __future__ import annotations

import asyncio
import json

import pytest

from pipeserve.gateway.backend import MODELS_TTL_S, Backend
from pipeserve.gateway.chunks import ChunkFormat, sse
from pipeserve.gateway.errors import ApiError
from pipeserve.gateway.requests import parse_params
from pipeserve.gateway.stops import StopMatcher
from pipeserve.v1 import pipeserve_pb2 as pb


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


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("extra", [{}, {"usage": None}])
def test_chunk_format_bytes_equal_the_json_of_the_chunk(chat, extra):
    head = {"id": 'cmpl-"x"\\1', "created": 1700000000, "model": "m/ü"}
    obj = "chat.completion.chunk" if chat else "text_completion"
    fmt = ChunkFormat(head, obj, extra, chat)
    for index, text, finish in [
        (0, "plain", None),
        (3, 'quote " back \\ nl \n tab \t ctl \x01 é 😀 \ufffd', None),
        (1, "", "stop"),
        (0, "last", "length"),
        (2, "", None),
    ]:
        if chat:
            delta = {} if finish is not None and not text else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        want = sse({**head, "object": obj, "choices": [choice], **extra})
        assert fmt.choice(index, text, finish) == want
        parsed = json.loads(want.decode().removeprefix("data: "))
        assert parsed["choices"][0]["index"] == index and parsed["object"] == obj


class _Coordinator:
    """ListModels of a fake coordinator: ``answer`` is what it says now; each call waits for
    ``gate`` (so a test can see whether a request waited for it)."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.answer = [
            pb.ModelInfo(name="m", state=pb.MODEL_STATE_READY, capabilities=["generate"])
        ]

    async def ListModels(self, request, metadata, timeout):  # the gRPC method's name
        self.calls += 1
        await self.gate.wait()
        return pb.ListModelsResponse(models=self.answer)


def test_a_stale_model_list_is_refreshed_beside_the_request_not_before_it():
    async def run() -> None:
        b = Backend("unused:1")
        b._stub = fake = _Coordinator()
        assert (await b.model("m", ())).name == "m" and fake.calls == 1  # first: asks
        await b.model("m", ())
        assert fake.calls == 1  # within MODELS_TTL_S: the cached answer
        b._models_at -= MODELS_TTL_S + 1
        fake.gate.clear()  # the coordinator is slow to answer ListModels now
        fake.answer = [pb.ModelInfo(name="m", state=pb.MODEL_STATE_LOADING)]
        m = await asyncio.wait_for(b.model("m", ()), 1)  # READY when cached: routed at once
        assert m.state == pb.MODEL_STATE_READY
        await b.model("m", ())
        await asyncio.sleep(0)
        assert fake.calls == 2  # one refresh in flight, not one per request
        fake.gate.set()
        await b._refresh
        with pytest.raises(ApiError) as e:  # the refreshed answer: not ready
            await b.model("m", ())
        assert e.value.status == 503 and fake.calls == 2
        b._models_at -= MODELS_TTL_S + 1  # a cached model that is not READY: asks first
        fake.answer = [
            pb.ModelInfo(name="m", state=pb.MODEL_STATE_READY, capabilities=["generate"])
        ]
        assert (await b.model("m", ())).state == pb.MODEL_STATE_READY and fake.calls == 3
        with pytest.raises(ApiError) as e:  # unknown: asks, then 404
            await b.model("other", ())
        assert e.value.status == 404 and fake.calls == 4
        await b.close()

    asyncio.run(run())
