"""gRPC servers and channels as every pipeserve process makes them: message-size limits,
TLS when configured, health and reflection registered, bytes counted, and gRPC's own logs of
a bad call kept to one line."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as _rpb2

from pipeserve.health import Health
from pipeserve.tls import current_tls

__all__ = [
    "CHANNEL_OPTIONS",
    "MAX_MESSAGE_BYTES",
    "SERVER_THREADS",
    "ByteCounter",
    "channel",
    "host_port",
    "make_server",
    "remaining",
    "serve_health_only",
]

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest gRPC message either way (a Forward tensor must fit; activations never go here)."""
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_http_proxy", 0),  # cluster-internal traffic never goes through a proxy
    # a restarted peer (a coordinator its workers heartbeat to) is found within 2 s; gRPC's
    # default backoff grows to 120 s, and after 10 s down a worker came back 10 s late
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class ByteCounter(grpc.ServerInterceptor):
    """Counts the serialized bytes of every message the server receives and sends."""

    def __init__(self) -> None:
        self.received = 0
        self.sent = 0
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return self.received + self.sent

    def _add(self, field: str, n: int) -> None:
        with self._lock:
            setattr(self, field, getattr(self, field) + n)

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or not hasattr(handler, "_replace"):
            return handler
        de, ser = handler.request_deserializer, handler.response_serializer

        def deserialize(raw: bytes) -> Any:
            self._add("received", len(raw))
            return de(raw) if de else raw

        def serialize(msg: Any) -> bytes:
            raw = ser(msg) if ser else msg
            self._add("sent", len(raw))
            return raw

        return handler._replace(request_deserializer=deserialize, response_serializer=serialize)


class _OneLine(logging.Filter):
    """gRPC's own logs of a bad call (an undecodable body, a handler's exception) as one line
    each instead of a traceback: hostile traffic must not flood the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            e = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(e).__name__}: {str(e)[:200]}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


for _name in ("grpc._server", "grpc._common"):  # handler errors; undecodable bodies
    logging.getLogger(_name).addFilter(_OneLine())

SERVER_THREADS = 2048
"""Threads per server: a streaming call holds one for its whole life, so this bounds the
concurrent streams a server holds (idle threads cost only address space)."""


def make_server(
    bind: str,
    service_names: Iterable[str],
    workers: int = SERVER_THREADS,
    interceptors: Iterable[grpc.ServerInterceptor] = (),
) -> tuple[grpc.Server, int, Health, ByteCounter]:
    """A server bound to ``bind`` (``host:port``; port 0 picks one) with health and reflection
    (v1alpha, and v1 under its own name) registered.  Add servicers, then ``start()``."""
    counter = ByteCounter()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        options=CHANNEL_OPTIONS,
        interceptors=[*interceptors, counter],
    )
    tls = current_tls()
    if tls.enabled:
        port = server.add_secure_port(bind, tls.server_credentials())
    else:
        port = server.add_insecure_port(bind)
    if port == 0:
        raise OSError(f"cannot listen on {bind}")
    health_ = Health(server)
    names = [*service_names, grpc_health.SERVICE_NAME, reflection.SERVICE_NAME]
    names.append("grpc.reflection.v1.ServerReflection")
    reflection.enable_server_reflection(names, server)
    _enable_reflection_v1(server, names)
    return server, port, health_, counter


def _enable_reflection_v1(server: grpc.Server, names: list[str]) -> None:
    """``grpc.reflection.v1`` has the same messages as v1alpha under another package name."""
    servicer = reflection.ReflectionServicer(names)
    handler = grpc.method_handlers_generic_handler(
        "grpc.reflection.v1.ServerReflection",
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=_rpb2.ServerReflectionRequest.FromString,
                response_serializer=_rpb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))


def remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the caller's deadline; None when it set none."""
    t = context.time_remaining()
    return t if t is not None and math.isfinite(t) and t < 1e9 else None


def host_port(host: str, port: int) -> str:
    """``host:port`` for gRPC, an IPv6 address in brackets (``[fd00::1]:50061``)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def channel(address: str) -> grpc.Channel:
    """A client channel to ``address`` with pipeserve's options (and TLS when configured)."""
    tls = current_tls()
    if tls.enabled:
        options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", tls.server_name)]
        return grpc.secure_channel(address, tls.channel_credentials(), options=options)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def serve_health_only(health: Health, bind: str) -> grpc.Server | None:
    """Plaintext ``grpc.health.v1`` on its own port (Kubernetes gRPC probes cannot do TLS)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=CHANNEL_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    server.add_insecure_port(bind)
    server.start()
    return server
