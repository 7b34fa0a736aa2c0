"""Bearer tokens on gRPC calls: the server interceptor that refuses a call without the right
``authorization: Bearer <token>``, the check itself, and the client side that sends one."""

from __future__ import annotations

import hmac
import logging
from typing import Any

import grpc

__all__ = ["BearerAuth", "bearer_error", "with_token"]

log = logging.getLogger(__name__)


def bearer_error(metadata: Any, token: str, what: str) -> tuple[grpc.StatusCode, str] | None:
    """Why ``metadata`` does not carry ``authorization: Bearer <token>`` (None: it does):
    none sent is UNAUTHENTICATED, a wrong one PERMISSION_DENIED."""
    sent = ""
    for k, v in metadata or ():
        if k == "authorization":
            sent = v if isinstance(v, str) else v.decode(errors="replace")
    if not sent:
        return grpc.StatusCode.UNAUTHENTICATED, f"{what} need 'authorization: Bearer <token>'"
    if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        return grpc.StatusCode.PERMISSION_DENIED, f"{what}: wrong token"
    return None


class BearerAuth(grpc.ServerInterceptor):
    """Refuses every call to ``service``'s methods without ``authorization: Bearer <token>``
    (health and reflection stay open); the method never runs."""

    def __init__(self, service: str, token: str, what: str) -> None:
        self.prefix, self.token, self.what = f"/{service}/", token, what

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        denied = bearer_error(details.invocation_metadata, self.token, self.what)
        if denied is None:
            return handler
        code, message = denied
        log.warning("refused %s: %s", details.method, message)

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(code, message)

        kind = ("stream_" if handler.request_streaming else "unary_") + (
            "stream" if handler.response_streaming else "unary"
        )
        return handler._replace(**{kind: deny})


def with_token(ch: grpc.Channel, token: str) -> grpc.Channel:
    """``ch`` with ``authorization: Bearer <token>`` added to every unary and server-streaming
    call (no token: ``ch`` itself)."""
    return grpc.intercept_channel(ch, _Token(token)) if token else ch


class _Token(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.md = ("authorization", f"Bearer {token}")

    def _add(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or []), self.md])

    def intercept_unary_unary(self, cont: Any, details: Any, req: Any) -> Any:
        return cont(self._add(details), req)

    def intercept_unary_stream(self, cont: Any, details: Any, req: Any) -> Any:
        return cont(self._add(details), req)
