"""One OpenAI choice = one ``pipeserve.v1`` Generate stream: text deltas with stop strings
applied, finish reason, token count; several choices merged as they produce."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import grpc

from pipeserve.gateway.backend import Backend, Metadata
from pipeserve.gateway.errors import ApiError, from_grpc
from pipeserve.gateway.stops import StopMatcher
from pipeserve.v1 import pipeserve_pb2 as pb

__all__ = ["Piece", "choice_stream", "merge"]

_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


@dataclass(slots=True)
class Piece:
    """Text of one choice that can be shown now; ``finish`` on its last piece."""

    text: str
    finish: str | None
    tokens: int
    """Completion tokens of the choice so far (up to the stop string, when one ended it)."""


async def choice_stream(
    backend: Backend, req: pb.GenerateRequest, stops: Sequence[str], md: Metadata
) -> AsyncIterator[Piece]:
    """Stream one choice.  A stop string ends it early: the Generate call is cancelled,
    which frees the request's KV cache on every stage (as a client disconnect does: the
    consumer going away closes this generator, and ``finally`` cancels the call)."""
    call = backend.generate(req, md)
    matcher = StopMatcher(stops)
    tokens = 0
    finished = False
    try:
        async for r in call:
            if finished:
                continue
            tokens += len(r.token_ids)
            text = matcher.push(r.text)
            if matcher.stopped:
                yield Piece(text, "stop", tokens)
                return
            if r.finish_reason:
                if r.finish_reason not in _FINISH:  # cancelled / timed out on the cluster
                    name = pb.FinishReason.Name(r.finish_reason).removeprefix("FINISH_REASON_")
                    raise ApiError(504 if name == "TIMEOUT" else 503, f"generation {name}")
                finished = True  # then read the call to its end: it finished OK, not cancelled
                yield Piece(text + matcher.flush(), _FINISH[r.finish_reason], tokens)
            elif text:
                yield Piece(text, None, tokens)
        if not finished:
            raise ApiError(502, "the coordinator ended the stream without a finish reason")
    except grpc.aio.AioRpcError as e:
        if not finished:
            raise from_grpc(e) from None
    finally:
        if not finished:
            call.cancel()


_END = object()


async def merge(streams: Sequence[AsyncIterator[Piece]]) -> AsyncIterator[tuple[int, Piece]]:
    """``(choice index, piece)`` from all streams as they come; the first error ends all."""
    if len(streams) == 1:  # the common case: no tasks, no queue
        async with aclosing(streams[0]) as only:
            async for p in only:
                yield 0, p
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[Piece]) -> None:
        try:
            async with aclosing(s):
                async for p in s:
                    await queue.put((i, p))
        except Exception as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, _END))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is _END:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
