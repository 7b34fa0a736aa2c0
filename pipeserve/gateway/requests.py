"""OpenAI request bodies (completions, chat) checked and turned into ``pipeserve.v1``
``GenerateRequest``s.  What the engine cannot do (log-probabilities, echo, penalties other
than the repetition penalty, tools) is refused with a 400 that says so, never faked."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeserve.gateway.errors import ApiError
from pipeserve.v1 import pipeserve_pb2 as pb

__all__ = [
    "MAX_CHOICES",
    "Params",
    "chat_messages",
    "completion_prompts",
    "generate_request",
    "parse_params",
]

MAX_CHOICES = 128
"""Prompts x ``n`` in one request, at most (each is a request of its own on the cluster)."""

_UNSUPPORTED = {
    # field: (value that means "not asked for", why we refuse it)
    "logprobs": ((None, False, 0), "log-probabilities are not produced by the engine"),
    "top_logprobs": ((None, 0), "log-probabilities are not produced by the engine"),
    "echo": ((None, False), "echo is not supported; the prompt is not returned"),
    "best_of": ((None, 1), "best_of is not supported; use n"),
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
    "frequency_penalty": ((None, 0, 0.0), "use repetition_penalty (the engine's penalty)"),
    "presence_penalty": ((None, 0, 0.0), "use repetition_penalty (the engine's penalty)"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "tools": ((None, []), "tools / function calling are not supported"),
    "functions": ((None, []), "tools / function calling are not supported"),
}


@dataclass(kw_only=True, slots=True)
class Params:
    """Decoding parameters of one OpenAI request (shared by all its choices)."""

    model: str
    max_tokens: int | None
    """None: the endpoint's default (16 for completions, the rest of the context for chat)."""
    temperature: float = 1.0
    """OpenAI's default is 1 (sampling); 0 is greedy."""
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    include_usage: bool = False


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise _bad(f"{name} must be a number in [{lo}, {hi}], got {v!r}", name)
    return float(v)


def _int(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(f"{name} must be an integer in [{lo}, {hi}], got {v!r}", name)
    return v


def parse_params(body: Any, chat: bool) -> Params:
    """Check the fields every generation endpoint shares (raises :class:`ApiError`)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required (a name from GET /v1/models)", "model")
    for name, (absent, why) in _UNSUPPORTED.items():
        if body.get(name) not in absent:
            raise _bad(f"{name}: {why}", name)
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise _bad("response_format: only plain text is supported", "response_format")
    max_tokens = _int(body, "max_tokens", 1, 2**31 - 1)
    if chat:
        max_tokens = _int(body, "max_completion_tokens", 1, 2**31 - 1) or max_tokens
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop must be a non-empty string or a list of them", "stop")
    if len(stop) > 16:
        raise _bad(f"at most 16 stop strings, got {len(stop)}", "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in stop_ids
    ):
        raise _bad("stop_token_ids must be a list of token ids", "stop_token_ids")
    stream = body.get("stream") or False
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise _bad("stream must be a boolean and stream_options an object", "stream")
    if options and not stream:
        raise _bad("stream_options is only allowed with stream: true", "stream_options")
    ignore_eos = body.get("ignore_eos") or False
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos must be a boolean", "ignore_eos")
    return Params(
        model=model,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 100.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        top_k=_int(body, "top_k", 0, 2**31 - 1) or 0,
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 1e-6, 100.0),
        seed=_int(body, "seed", 0, 2**64 - 1),
        stop=stop,
        stop_token_ids=stop_ids,
        ignore_eos=ignore_eos,
        n=_int(body, "n", 1, MAX_CHOICES) or 1,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def completion_prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """``prompt`` as a list of prompts: a string, a list of strings, token ids, or a list of
    token-id lists (raises :class:`ApiError`)."""
    p = body.get("prompt")
    if isinstance(p, str):
        prompts: list[Any] = [p]
    elif _is_ids(p) and p:
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) or _is_ids(x) for x in p):
        prompts = list(p)
    else:
        raise _bad(
            "prompt must be a string, a list of strings, a list of token ids or a list of "
            "token-id lists",
            "prompt",
        )
    if any(not x for x in prompts):
        raise _bad("a prompt is empty", "prompt")
    return prompts


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """``messages`` as ``[{"role", "content"}]`` with text content (parts of type text are
    joined); anything else is refused (raises :class:`ApiError`)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}] needs a role and content", "messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(c, dict) and c.get("type") == "text" for c in content):
                raise _bad(f"messages[{i}]: only text content is supported", "messages")
            content = "".join(str(c.get("text", "")) for c in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string or text parts", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def generate_request(p: Params, ids: list[int], max_tokens: int, choice: int) -> pb.GenerateRequest:
    """The ``pipeserve.v1`` request of one choice.  With a seed, choice ``j`` samples with
    ``seed + j`` so that ``n`` choices differ and each is reproducible."""
    s = pb.SamplingParameters(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        repetition_penalty=p.repetition_penalty,
        stop_token_ids=p.stop_token_ids,
        ignore_eos=p.ignore_eos,
    )
    if p.seed is not None:
        s.seed = (p.seed + choice) % 2**64
    return pb.GenerateRequest(
        model=p.model, token_ids=pb.TokenIds(ids=ids), max_new_tokens=max_tokens, sampling=s
    )
