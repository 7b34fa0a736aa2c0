"""gRPC plumbing shared by the coordinator and the stage workers: server set-up with health
and reflection, message-size limits, and how errors become status codes."""

from __future__ import annotations

import hmac
import logging
import math
import os
import queue
import threading
from collections.abc import Iterable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as _rpb2

from pipeline_core import (
    CheckpointError,
    DoesNotFit,
    GenerationFailed,
    PlanError,
    RequestError,
    ResourceExhausted,
    SamplingParams,
    TraceError,
    Workload,
)

__all__ = [
    "CHANNEL_OPTIONS",
    "MAX_MESSAGE_BYTES",
    "TLS",
    "BearerAuth",
    "ByteCounter",
    "Health",
    "abort_for",
    "channel",
    "check_generate",
    "clip",
    "configure_tls",
    "host_port",
    "make_server",
    "remaining",
    "sampling_from_proto",
    "serve_health_only",
    "tensor_from_bytes",
    "tensor_from_proto",
    "tensor_to_proto",
    "with_token",
    "workload_from_proto",
]

log = logging.getLogger(__name__)

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
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class _HealthServicer(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1`` whose ``set`` never blocks.

    [Note: health never blocks a heartbeat] grpc's own servicer sends every status change to
    each ``Watch`` stream from inside ``set``, under its lock, and waits for the send to
    complete: one watcher that does not read (or a slow one) blocks every caller of ``set``
    -- the worker's heartbeat loop sets its health on every beat, the coordinator sets a
    model's health while holding its cluster lock -- so a stalled watcher made live workers
    "lost" and stalled the coordinator's heartbeats.  Here ``set`` only queues the change;
    each watcher's own call thread sends it, and watchers are bounded.
    """

    MAX_WATCHERS = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: dict[str, int] = {"": SERVING}
        self._watchers: dict[str, set[queue.SimpleQueue]] = {}
        self._shutting_down = False

    def set(self, service: str, status: int) -> None:
        with self._lock:
            if self._shutting_down or self._status.get(service) == status:
                return
            self._status[service] = status
            for q in self._watchers.get(service, ()):
                q.put(status)

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING from now on (as grpc's servicer does)."""
        with self._lock:
            for service in self._status:
                self._status[service] = NOT_SERVING
                for q in self._watchers.get(service, ()):
                    q.put(NOT_SERVING)
            self._shutting_down = True

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            status = self._status.get(request.service)
            known = sorted(self._status)
        if status is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no health status for service {clip(request.service)}; known: "
                f"{', '.join(repr(k) for k in known)[:2000]} (a model's is "
                "pipeserve.model.NAME)",
            )
        return health_pb2.HealthCheckResponse(status=status)

    def List(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            statuses = dict(self._status)
        return health_pb2.HealthListResponse(
            statuses={k: health_pb2.HealthCheckResponse(status=v) for k, v in statuses.items()}
        )

    def Watch(self, request: Any, context: grpc.ServicerContext) -> Any:
        service, q = request.service, queue.SimpleQueue()
        with self._lock:
            if sum(map(len, self._watchers.values())) >= self.MAX_WATCHERS:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{self.MAX_WATCHERS} health watchers already; use Check",
                )
            self._watchers.setdefault(service, set()).add(q)
            q.put(self._status.get(service, SERVICE_UNKNOWN))
        try:
            last = None
            while context.is_active():
                try:
                    status = q.get(timeout=1.0)
                except queue.Empty:
                    continue
                if status != last:
                    last = status
                    yield health_pb2.HealthCheckResponse(status=status)
        finally:
            with self._lock:
                self._watchers[service].discard(q)


class Health:
    """``grpc.health.v1`` with one status per service name ("" is the whole server)."""

    def __init__(self, server: grpc.Server) -> None:
        self.servicer = _HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    def set(self, service: str, serving: bool) -> None:
        self.servicer.set(service, SERVING if serving else NOT_SERVING)


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


@dataclass
class TLS:
    """TLS for every gRPC server and client of this process (all empty: plaintext).

    ``cert``/``key``: this process's certificate (servers serve with it; under mTLS it is
    also presented as a client).  ``ca``: the CA that signs peers: clients verify servers
    with it, and a server given a CA *requires* client certificates (mutual TLS).  Clients
    verify the name ``server_name`` (every pipeserve server certificate carries it).
    """

    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = "pipeserve"

    @classmethod
    def from_env(cls) -> TLS:
        return cls(
            ca=os.environ.get("PIPESERVE_TLS_CA", ""),
            cert=os.environ.get("PIPESERVE_TLS_CERT", ""),
            key=os.environ.get("PIPESERVE_TLS_KEY", ""),
        )

    @property
    def enabled(self) -> bool:
        return bool(self.ca or self.cert)

    @staticmethod
    def _read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    def server_credentials(self) -> grpc.ServerCredentials:
        if not (self.cert and self.key):
            raise ValueError("a TLS server needs a certificate and a key (--tls-cert/--tls-key)")
        ca = self._read(self.ca)
        return grpc.ssl_server_credentials(
            [(self._read(self.key), self._read(self.cert))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.ca),
            private_key=self._read(self.key),
            certificate_chain=self._read(self.cert),
        )


_TLS = TLS()


def configure_tls(tls: TLS) -> None:
    """Set this process's TLS for :func:`make_server` and :func:`channel`."""
    global _TLS
    _TLS = tls


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
    if _TLS.enabled:
        port = server.add_secure_port(bind, _TLS.server_credentials())
    else:
        port = server.add_insecure_port(bind)
    if port == 0:
        raise OSError(f"cannot listen on {bind}")
    health_ = Health(server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
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
    if _TLS.enabled:
        options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", _TLS.server_name)]
        return grpc.secure_channel(address, _TLS.channel_credentials(), options=options)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def serve_health_only(health: Health, bind: str) -> grpc.Server | None:
    """Plaintext ``grpc.health.v1`` on its own port (Kubernetes gRPC probes cannot do TLS)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=CHANNEL_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    server.add_insecure_port(bind)
    server.start()
    return server


def abort_for(context: grpc.ServicerContext, e: BaseException) -> None:
    """End the call with the status code that fits ``e`` (raises)."""
    if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
        context.abort(e.code(), e.details() or str(e))
    status = getattr(e, "status", None)  # a domain error names its status (coordinator.errors)
    if isinstance(status, str) and status in grpc.StatusCode.__members__:
        context.abort(grpc.StatusCode[status], str(e))
    if isinstance(e, DoesNotFit):  # the request is fine; the cluster is too small for it
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    if isinstance(e, RequestError | ValueError | TypeError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if isinstance(e, ResourceExhausted):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    if isinstance(e, PlanError | FileNotFoundError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if isinstance(e, TraceError | CheckpointError):  # the model or its files, not the server
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    if isinstance(e, GenerationFailed):
        context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
    log.exception("internal error")
    context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")


def workload_from_proto(w: Any, device: str = "cpu", threads: int = 1) -> Workload:
    """A ``pipeline_core`` ``Workload`` from a ``pipeserve.v1.Workload`` (0 -> defaults)."""
    d = Workload()
    return Workload(
        batch=w.batch or d.batch,
        seq=w.seq or d.seq,
        chunks=w.chunks or d.chunks,
        kv_tokens=w.kv_tokens,
        device=device,
        threads=threads,
    )


ECHO_CHARS = 80
"""The most of a caller's string an error message repeats back."""


def clip(text: str, n: int = ECHO_CHARS) -> str:
    """``repr(text)`` for an error message, cut to about ``n`` characters: a 1 MB name must
    not come back in a status (it would not even fit gRPC's metadata)."""
    if len(text) <= n:
        return repr(text)
    return f"{text[:n]!r}... ({len(text)} characters)"


def check_generate(req: Any) -> SamplingParams:
    """What can be checked of a ``GenerateRequest`` without the model (raises
    ``RequestError``): a prompt, sane numbers.  Ids against the vocabulary and lengths
    against the context are the stage-0 worker's to check."""
    if req.HasField("text"):
        if not req.text:
            raise RequestError("the text prompt is empty; give some text or token_ids")
    elif not req.token_ids.ids:
        raise RequestError("the prompt is empty; give text or at least one token id")
    for what, ids in (("prompt", req.token_ids.ids), ("resume_token_ids", req.resume_token_ids)):
        bad = [t for t in ids if t < 0]
        if bad:
            raise RequestError(f"{what}: token ids {bad[:5]} are negative")
    bad = [t for t in req.sampling.stop_token_ids if t < 0]
    if bad:
        raise RequestError(f"stop token ids {bad[:5]} are negative")
    params = sampling_from_proto(req)
    params.validate(1, None)
    return params


def sampling_from_proto(req: Any) -> SamplingParams:
    """``SamplingParams`` from a ``pipeserve.v1.GenerateRequest`` (proto defaults -> ours)."""
    s = req.sampling
    return SamplingParams(
        max_new_tokens=req.max_new_tokens or 32,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p or 1.0,
        repetition_penalty=s.repetition_penalty or 1.0,
        seed=s.seed if s.HasField("seed") else None,
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        timeout_s=req.timeout_s or None,
    )


_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def tensor_from_proto(t: Any) -> torch.Tensor:
    """A ``pipeserve.v1.Tensor`` as a torch tensor (raises ValueError on a mismatch)."""
    return tensor_from_bytes(t.data, t.dtype, list(t.shape), t.name)


def tensor_from_bytes(data: bytes, dtype: str, shape: list[int], name: str = "") -> torch.Tensor:
    if dtype not in _DTYPES:
        raise ValueError(f"input {name!r}: unknown dtype {dtype!r}; use one of {list(_DTYPES)}")
    dt = _DTYPES[dtype]
    n = math.prod(shape) if shape else 1
    if len(data) != n * dt.itemsize:
        raise ValueError(
            f"input {name!r}: {len(data)} bytes do not fit shape {shape} of {dtype} "
            f"({n * dt.itemsize} bytes)"
        )
    if n == 0:
        return torch.empty(shape, dtype=dt)
    return torch.frombuffer(bytearray(data), dtype=dt).reshape(shape)


def tensor_to_proto(name: str, t: torch.Tensor) -> Any:
    from pipeserve.v1 import pipeserve_pb2 as pb

    t = t.detach().cpu().contiguous()
    if t.dtype not in _NAMES:
        raise ValueError(f"output {name!r} has dtype {t.dtype}, which cannot be sent")
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.Tensor(name=name, dtype=_NAMES[t.dtype], shape=list(t.shape), data=data)
