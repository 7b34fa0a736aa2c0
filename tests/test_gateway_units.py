"""The gateway's pure parts: stop strings across stream deltas, request checks."""

from __future__ import annotations

import json

import pytest

from pipeserve.gateway.chunks import ChunkFormat, sse
from pipeserve.gateway.errors import ApiError
from pipeserve.gateway.requests import parse_params
from pipeserve.gateway.stops import StopMatcher


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
