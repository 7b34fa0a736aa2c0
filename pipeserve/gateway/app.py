"""The OpenAI-compatible HTTP API (Starlette): ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions``, plus ``/health``, ``/ready`` and ``/metrics``.

Every request becomes one ``pipeserve.v1`` ``Generate`` call per choice on the coordinator;
the gateway holds no model.  Its ``x-request-id`` (the client's, or a new one) goes to the
coordinator as the gRPC request id and comes back as a response header; the client's
``Authorization`` header goes along as the coordinator's client token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pipeserve.gateway.backend import Backend, Metadata, ModelFiles
from pipeserve.gateway.chunks import DONE, ChunkFormat, sse
from pipeserve.gateway.errors import ApiError
from pipeserve.gateway.metrics import GatewayMetrics
from pipeserve.gateway.requests import (
    MAX_CHOICES,
    Params,
    chat_messages,
    completion_prompts,
    generate_request,
    parse_params,
)
from pipeserve.gateway.streams import Piece, choice_stream, merge
from pipeserve.observe import REQUEST_ID

__all__ = ["create_app"]

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_COMPLETION_TOKENS = 16
"""``max_tokens`` of /v1/completions when the request gives none (OpenAI's default)."""
DEFAULT_CHAT_TOKENS = 1024
"""``max_tokens`` of /v1/chat/completions when the request gives none: the rest of the
context, but at most this (the engine reserves KV for every token a request may make)."""


class ClientGone(Exception):
    """The HTTP client disconnected before its response started."""


async def _unless_disconnected(request: Request, aw: Awaitable[T]) -> T:
    """Await ``aw``, cancelling it (and so its Generate calls) if the client disconnects."""
    work = asyncio.ensure_future(aw)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise ClientGone
    return work.result()


class Gateway:
    def __init__(self, backend: Backend, metrics: GatewayMetrics) -> None:
        self.backend = backend
        self.metrics = metrics

    # ------------------------------------------------------------------ plain endpoints
    async def models(self, request: Request) -> Response:
        rid, md = self._ids(request)
        try:
            models = await self.backend.ready_models(md)
        except ApiError as e:
            return self._error(e, rid, "models")
        data = [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "pipeserve"} for m in models
        ]
        self.metrics.requests.labels("models", "200").inc()
        return JSONResponse({"object": "list", "data": data}, headers={"x-request-id": rid})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """200 when the coordinator answers (any model state), else 503."""
        try:
            await self.backend.list_models(())
        except ApiError as e:
            if e.status not in (401, 403):  # a client token is required: still reachable
                return JSONResponse(e.body(), status_code=503)
        return JSONResponse({"status": "ready"})

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ generation
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    def _ids(self, request: Request) -> tuple[str, Metadata]:
        rid = (request.headers.get("x-request-id") or uuid.uuid4().hex[:16])[:64]
        REQUEST_ID.set(rid)
        md = [("x-request-id", rid)]
        if auth := request.headers.get("authorization"):
            md.append(("authorization", auth))
        return rid, md

    def _error(self, e: ApiError, rid: str, endpoint: str) -> Response:
        self.metrics.requests.labels(endpoint, str(e.status)).inc()
        if e.status >= 500:
            log.warning("%s: %s %s", endpoint, e.status, e.message)
        return JSONResponse(e.body(), status_code=e.status, headers={"x-request-id": rid})

    async def _generate(self, request: Request, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        rid, md = self._ids(request)
        start = time.perf_counter()
        self.metrics.inflight.labels(endpoint).inc()
        streaming = False
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(400, f"the body is not valid JSON: {e}") from None
            p = parse_params(body, chat)
            info = await self.backend.model(p.model, md)
            files = await self.backend.files(info)
            prompts = self._chat_prompt(body, files) if chat else self._prompts(body, files)
            if len(prompts) * p.n > MAX_CHOICES:
                raise ApiError(400, f"prompts x n must be at most {MAX_CHOICES}", param="n")
            streams = []
            for i, ids in enumerate(prompts):
                max_tokens = self._max_tokens(p, ids, files, chat)
                for j in range(p.n):
                    req = generate_request(p, ids, max_tokens, i * p.n + j)
                    streams.append(choice_stream(self.backend, req, p.stop, md))
            events = merge(streams)
            usage = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 0}
            head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}", "created": int(time.time())}
            head["model"] = p.model
            if not p.stream:
                out = await _unless_disconnected(
                    request, self._collect(events, head, usage, chat, len(streams))
                )
                self._done(endpoint, "200", start, usage)
                return JSONResponse(out, headers={"x-request-id": rid})
            # the first piece before the headers: errors up to it get their HTTP status
            first = await _unless_disconnected(request, anext(events, None))
            self.metrics.ttfb.labels(endpoint).observe(time.perf_counter() - start)
            streaming = True
            sse = self._stream(first, events, head, usage, p, chat, len(streams), endpoint, start)
            return StreamingResponse(
                sse, media_type="text/event-stream", headers={"x-request-id": rid}
            )
        except ApiError as e:
            return self._error(e, rid, endpoint)
        except ClientGone:
            self.metrics.disconnects.labels(endpoint).inc()
            self.metrics.requests.labels(endpoint, "499").inc()
            return Response(status_code=499)
        finally:
            if not streaming:
                self.metrics.inflight.labels(endpoint).dec()

    def _done(self, endpoint: str, status: str, start: float, usage: dict[str, int]) -> None:
        self.metrics.requests.labels(endpoint, status).inc()
        self.metrics.duration.labels(endpoint).observe(time.perf_counter() - start)
        self.metrics.tokens.labels(endpoint).inc(usage["completion_tokens"])

    @staticmethod
    def _tokenizer(files: ModelFiles, what: str) -> Any:
        if files.tokenizer is None:
            raise ApiError(
                400,
                f"{what} need the model's tokenizer, which the gateway cannot read in "
                f"{files.where}: mount the checkpoint on the gateway at that path or start it "
                "with --tokenizer MODEL=DIR (or send token ids to /v1/completions)",
            )
        return files.tokenizer

    def _prompts(self, body: dict[str, Any], files: ModelFiles) -> list[list[int]]:
        out = []
        for prompt in completion_prompts(body):
            if isinstance(prompt, str):
                prompt = self._tokenizer(files, "text prompts")(prompt)["input_ids"]
            out.append(list(prompt))
        return out

    def _chat_prompt(self, body: dict[str, Any], files: ModelFiles) -> list[list[int]]:
        messages = chat_messages(body)
        tok = self._tokenizer(files, "chat requests")
        if not getattr(tok, "chat_template", None):
            raise ApiError(
                400,
                "this model's tokenizer has no chat template, so chat messages cannot be "
                "turned into a prompt; use /v1/completions with a prompt",
                param="messages",
            )
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # the template's own checks (roles, alternation)
            raise ApiError(400, f"the chat template refused the messages: {e}") from None
        return [list(tok(text, add_special_tokens=False)["input_ids"])]

    @staticmethod
    def _max_tokens(p: Params, ids: list[int], files: ModelFiles, chat: bool) -> int:
        if p.max_tokens is not None:
            return p.max_tokens
        if not chat:
            return DEFAULT_COMPLETION_TOKENS
        if files.context is None:
            return DEFAULT_CHAT_TOKENS
        if files.context <= len(ids):
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens; the model's context is {files.context}",
                param="messages",
            )
        return min(files.context - len(ids), DEFAULT_CHAT_TOKENS)

    # ------------------------------------------------------------------ responses
    @staticmethod
    def _choice(i: int, text: str, finish: str | None, chat: bool, stream: bool) -> dict:
        if not chat:
            return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
        key = "delta" if stream else "message"
        msg: dict[str, Any] = {"content": text} if stream else {"role": "assistant"}
        if not stream:
            msg["content"] = text
        elif finish is not None and not text:
            msg = {}
        return {"index": i, key: msg, "logprobs": None, "finish_reason": finish}

    async def _collect(
        self,
        events: AsyncIterator[tuple[int, Piece]],
        head: dict[str, Any],
        usage: dict[str, int],
        chat: bool,
        n: int,
    ) -> dict[str, Any]:
        texts = [""] * n
        finish: list[str | None] = [None] * n
        async for i, piece in events:
            texts[i] += piece.text
            if piece.finish:
                finish[i] = piece.finish
                usage["completion_tokens"] += piece.tokens
        choices = [self._choice(i, texts[i], finish[i], chat, False) for i in range(n)]
        obj = "chat.completion" if chat else "text_completion"
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {**head, "object": obj, "choices": choices, "usage": usage}

    async def _stream(
        self,
        first: tuple[int, Piece] | None,
        events: AsyncIterator[tuple[int, Piece]],
        head: dict[str, Any],
        usage: dict[str, int],
        p: Params,
        chat: bool,
        n: int,
        endpoint: str,
        start: float,
    ) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if p.include_usage else {}
        fmt = ChunkFormat(head, obj, extra, chat)  # per token: only the text is encoded
        status = "200"
        try:
            if chat:  # the assistant's role first, as OpenAI streams it
                roles = [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                    for i in range(n)
                ]
                choices = [{**c, "finish_reason": None} for c in roles]
                yield sse({**head, "object": obj, "choices": choices, **extra})
            try:
                if first is not None:
                    i, piece = first
                    if piece.finish:
                        usage["completion_tokens"] += piece.tokens
                    yield fmt.choice(i, piece.text, piece.finish)
                async for i, piece in events:
                    if piece.finish:
                        usage["completion_tokens"] += piece.tokens
                    yield fmt.choice(i, piece.text, piece.finish)
            except ApiError as e:  # after the headers: the error goes in the stream
                status = str(e.status)
                log.warning("%s stream: %s %s", endpoint, e.status, e.message)
                yield sse(e.body())
                return
            if p.include_usage:
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                yield sse({**head, "object": obj, "choices": [], "usage": usage})
            yield DONE
        except (asyncio.CancelledError, GeneratorExit):
            status = "499"
            self.metrics.disconnects.labels(endpoint).inc()
            raise
        finally:
            await events.aclose()  # cancels Generate calls still running
            self._done(endpoint, status, start, usage)
            self.metrics.inflight.labels(endpoint).dec()


def create_app(backend: Backend, metrics: GatewayMetrics | None = None) -> Starlette:
    """The ASGI app; ``backend`` is used (and closed at shutdown) in the server's loop."""
    g = Gateway(backend, metrics or GatewayMetrics())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await backend.close()

    routes = [
        Route("/v1/models", g.models, methods=["GET"]),
        Route("/v1/completions", g.completions, methods=["POST"]),
        Route("/v1/chat/completions", g.chat, methods=["POST"]),
        Route("/health", g.health, methods=["GET"]),
        Route("/ready", g.ready, methods=["GET"]),
        Route("/metrics", g.prometheus, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.gateway = g
    return app
