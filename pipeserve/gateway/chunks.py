"""Server-sent events of a streamed response, encoded without building a dict per token.

A streamed chunk differs from the one before only in its choice index, text and finish
reason, so :class:`ChunkFormat` serializes the rest once per response (from the same dict
:func:`sse` would encode, so the key order and spelling cannot drift) and per token only
escapes the text.  The bytes equal ``sse(chunk dict)`` exactly (``tests/test_gateway_units``).
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii as _quote  # json.dumps' own str encoder
from typing import Any

__all__ = ["DONE", "ChunkFormat", "sse"]

DONE = b"data: [DONE]\n\n"
_HOLE = "\x00choice\x00"
_FINISH = {None: "null", "stop": '"stop"', "length": '"length"'}


def sse(obj: Any) -> bytes:
    """One ``data:`` event with ``obj`` as compact JSON."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


class ChunkFormat:
    """The events of one streamed response: ``head`` (id, created, model), the chunk
    ``object`` name, and ``extra`` keys every chunk carries (``usage: null``)."""

    def __init__(self, head: dict[str, Any], obj: str, extra: dict[str, Any], chat: bool) -> None:
        skeleton = sse({**head, "object": obj, "choices": [_HOLE], **extra}).decode()
        before, after = skeleton.split(_quote(_HOLE))
        self._before = before + '{"index":'
        self._after = "}" + after
        self._fin = ',"logprobs":null,"finish_reason":'
        self._chat = chat
        self._text = ',"delta":{"content":' if chat else ',"text":'

    def choice(self, index: int, text: str, finish: str | None) -> bytes:
        """The chunk of choice ``index``: its new ``text`` and ``finish`` reason (or None)."""
        fin = _FINISH.get(finish) or _quote(finish)
        if self._chat:
            delta = ',"delta":{}' if finish is not None and not text else None
            body = delta or f"{self._text}{_quote(text)}}}"
        else:
            body = f"{self._text}{_quote(text)}"
        return f"{self._before}{index}{body}{self._fin}{fin}{self._after}".encode()
