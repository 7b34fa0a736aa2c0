"""gRPC plumbing shared by the coordinator and the stage workers: server set-up with health
and reflection, message-size limits, and how errors become status codes."""

from __future__ import annotations

import logging
import math
import os
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
    "ByteCounter",
    "Health",
    "abort_for",
    "channel",
    "configure_tls",
    "host_port",
    "make_server",
    "remaining",
    "sampling_from_proto",
    "serve_health_only",
    "tensor_from_bytes",
    "tensor_from_proto",
    "tensor_to_proto",
    "workload_from_proto",
]

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest gRPC message either way (a Forward tensor must fit; activations never go here)."""
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_http_proxy", 0),  # cluster-internal traffic never goes through a proxy
]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """``grpc.health.v1`` with one status per service name ("" is the whole server)."""

    def __init__(self, server: grpc.Server) -> None:
        self.servicer = health.HealthServicer()
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
    bind: str, service_names: Iterable[str], workers: int = SERVER_THREADS
) -> tuple[grpc.Server, int, Health, ByteCounter]:
    """A server bound to ``bind`` (``host:port``; port 0 picks one) with health and reflection
    (v1alpha, and v1 under its own name) registered.  Add servicers, then ``start()``."""
    counter = ByteCounter()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        options=CHANNEL_OPTIONS,
        interceptors=[counter],
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
