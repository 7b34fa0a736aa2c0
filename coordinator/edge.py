"""What every coordinator servicer does at the edge: check the caller's token, give the relay
its view of the call (with a request id), and end a failed call with its status code."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from pipeserve import rpc
from pipeserve.observe import new_request_id

__all__ = ["check_token", "client_call", "edge"]


def check_token(context: grpc.ServicerContext, token: str, what: str, env: str) -> None:
    """No token: UNAUTHENTICATED; a wrong one: PERMISSION_DENIED (no token set: open)."""
    if not token:
        return
    denied = rpc.bearer_error(context.invocation_metadata(), token, what)
    if denied is not None:
        context.abort(denied[0], f"{denied[1]} ({env})")


class _ClientCall:
    """A gRPC call as :class:`coordinator.relay.ClientCall`."""

    def __init__(self, context: grpc.ServicerContext, request_id: str) -> None:
        self.context = context
        self.peer = context.peer().rsplit(":", 1)[0]  # the client's address, without its port
        self.request_id = request_id

    def is_active(self) -> bool:
        return self.context.is_active()

    def remaining(self) -> float | None:
        return rpc.remaining(self.context)

    def on_done(self, fn: Callable[[], Any]) -> None:
        self.context.add_callback(fn)


def client_call(context: grpc.ServicerContext) -> _ClientCall:
    """The relay's view of ``context``; its request id (the caller's ``x-request-id`` or a
    new one) goes back in the initial metadata."""
    rid = new_request_id(context.invocation_metadata())
    context.send_initial_metadata((("x-request-id", rid),))
    return _ClientCall(context, rid)


def edge(fn: Callable[..., Any]) -> Callable[..., Any]:
    """An RPC: authorized first, then any error ends the call with its status code."""

    @functools.wraps(fn)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        self.authorize(context)
        try:
            return fn(self, request, context)
        except Exception as e:
            rpc.abort_for(context, e)

    @functools.wraps(fn)
    def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.authorize(context)
        try:
            yield from fn(self, request, context)
        except Exception as e:
            rpc.abort_for(context, e)

    return stream if inspect.isgeneratorfunction(fn) else unary
