"""Hostile calls against a running cluster: every RPC of the coordinator (pipeserve.v1
Inference, Admin, Registry; KServe; health) and of the stage workers (StageWorker; health),
with random bodies and with well-formed messages whose fields are abused (NaN, huge and
negative numbers, NUL bytes, megabyte strings, path traversal, unknown models...).

:func:`hostile_calls` returns the status codes seen; a well-formed message must never get
UNKNOWN or INTERNAL (only a body that does not parse may get INTERNAL, which is how gRPC
answers a request it cannot deserialize).  Used by ``tests/test_hardening.py`` (a small
count) and ``bench/bench_hostile.py`` (10,000+ calls).
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf.message import DecodeError

__all__ = ["FORBIDDEN", "Tally", "hostile_calls", "methods"]

FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
SAFE_NAMES = {"m"}
"""Names of the good traffic's model: never unloaded or drained by the hostile calls."""

_STRINGS = [
    "",
    "m",
    "nope",
    "../../../../etc/passwd",
    "/etc",
    "/proc/self/mem",
    "a\x00b",
    "\u202e\U0001f600",
    "x" * 70_000,
    "w1-dead",
    "m/1/key",
    "ready/0",
    "1",
    "-1",
    "NaN",
]
_INTS = [0, 1, -1, 2, 7, 255, 2**15, 2**31 - 1, -(2**31), 2**62, -(2**62)]
_FLOATS = [0.0, 1.0, -1.0, 0.5, 1e30, -1e30, float("nan"), float("inf"), float("-inf"), 1e-45]
_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(fd: Any, rng: random.Random) -> Any:
    t = fd.type
    if t in _RANGES:
        lo, hi = _RANGES[t]
        v = rng.choice([*_INTS, rng.randint(-1000, 1000), rng.randint(lo, hi)])
        return min(max(v, lo), hi)
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return rng.choice([*_FLOATS, rng.uniform(-10, 10)])
    if t == F.TYPE_BOOL:
        return rng.random() < 0.5
    if t == F.TYPE_STRING:
        return rng.choice([*_STRINGS, "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(8))])
    if t == F.TYPE_BYTES:
        return rng.choice([b"", b"\x00" * 8, rng.randbytes(rng.randint(1, 600)), b"1"])
    if t == F.TYPE_ENUM:
        return rng.choice([v.number for v in fd.enum_type.values] + [0, 99])
    raise TypeError(t)


def fill(msg: Any, rng: random.Random, depth: int = 0) -> Any:
    """Set a random subset of ``msg``'s fields to abusive values (recursively)."""
    for fd in msg.DESCRIPTOR.fields:
        if rng.random() < 0.4:
            continue
        if fd.message_type is not None:
            if depth >= 3:
                continue
            if fd.message_type.GetOptions().map_entry:
                m = getattr(msg, fd.name)
                kfd, vfd = (
                    fd.message_type.fields_by_name["key"],
                    fd.message_type.fields_by_name["value"],
                )
                for _ in range(rng.randint(0, 3)):
                    k = _scalar(kfd, rng)
                    if vfd.message_type is not None:
                        fill(m[k], rng, depth + 1)
                    else:
                        m[k] = _scalar(vfd, rng)
            elif fd.is_repeated:
                for _ in range(rng.randint(0, 4)):
                    fill(getattr(msg, fd.name).add(), rng, depth + 1)
            else:
                fill(getattr(msg, fd.name), rng, depth + 1)
                getattr(msg, fd.name).SetInParent()
        elif fd.is_repeated:
            n = rng.choice([0, 1, 3, 20, 3000]) if fd.type != F.TYPE_STRING else rng.randint(0, 3)
            getattr(msg, fd.name).extend(_scalar(fd, rng) for _ in range(n))
        else:
            setattr(msg, fd.name, _scalar(fd, rng))
    return msg


_KSERVE = "/inference.GRPCInferenceService/"
KSERVE = {
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "ModelConfig",
}
"""The KServe methods pipeserve serves (tritonclient's service lists more)."""


@dataclass
class Method:
    server: str  # "coordinator" or a worker's address
    path: str
    request: Any  # the request message class
    client_streaming: bool
    server_streaming: bool


def methods(coordinator: str, workers: list[str]) -> list[Method]:
    """Every RPC the cluster's servers offer (reflection aside)."""
    from grpc_health.v1 import health_pb2
    from tritonclient.grpc import service_pb2 as kv2

    from pipeserve.v1 import pipeserve_pb2 as pb

    out = []

    def add(server: str, file: Any, service: str, module: Any) -> None:
        sd = file.services_by_name[service]
        for m in sd.methods:
            cls = getattr(module, m.input_type.name)
            path = f"/{sd.full_name}/{m.name}"
            out.append(Method(server, path, cls, m.client_streaming, m.server_streaming))

    for service in ("Inference", "Admin", "Registry"):
        add(coordinator, pb.DESCRIPTOR, service, pb)
    add(coordinator, kv2.DESCRIPTOR, "GRPCInferenceService", kv2)
    out = [m for m in out if not m.path.startswith(_KSERVE) or m.path[len(_KSERVE) :] in KSERVE]
    for server in [coordinator, *workers]:
        add(server, health_pb2.DESCRIPTOR, "Health", health_pb2)
    for w in workers:
        add(w, pb.DESCRIPTOR, "StageWorker", pb)
    return out


@dataclass
class Tally:
    codes: Counter = field(default_factory=Counter)
    bad: list = field(default_factory=list)
    """(method, code, details, well_formed) of every forbidden answer."""
    calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, method: str, code: grpc.StatusCode, details: str, well_formed: bool) -> None:
        with self.lock:
            self.calls += 1
            self.codes[code.name] += 1
            if code in FORBIDDEN and (well_formed or code == grpc.StatusCode.UNKNOWN):
                self.bad.append((method, code.name, (details or "")[:300], well_formed))


def _body(m: Method, rng: random.Random) -> tuple[bytes, bool]:
    """A request body and whether it parses as the method's request message."""
    if rng.random() < 0.15:  # random bytes
        raw = rng.randbytes(rng.randint(0, 300))
        try:
            m.request.FromString(raw)
            return raw, True
        except (DecodeError, RuntimeError, ValueError):
            return raw, False
    msg = fill(m.request(), rng)
    if m.path.endswith(("/UnloadModel", "/DrainWorker")):  # keep the good model serving
        for name in ("name", "worker_id"):
            if getattr(msg, name, None) in SAFE_NAMES:
                setattr(msg, name, "not-" + getattr(msg, name))
    if m.path.endswith("/LoadModel") and msg.name in SAFE_NAMES:
        msg.name = "other"
    return msg.SerializeToString(), True


def _call(channels: dict[str, grpc.Channel], m: Method, body: bytes, timeout: float) -> Any:
    ch = channels[m.server]
    ident = lambda b: b  # noqa: E731 -- bytes in, bytes out
    if m.client_streaming:
        call = ch.stream_stream(m.path, request_serializer=ident, response_deserializer=ident)
        return list(call(iter([body, body]), timeout=timeout))
    if m.server_streaming:
        call = ch.unary_stream(m.path, request_serializer=ident, response_deserializer=ident)
        return list(call(body, timeout=timeout))
    call = ch.unary_unary(m.path, request_serializer=ident, response_deserializer=ident)
    return call(body, timeout=timeout)


def hostile_calls(
    coordinator: str,
    workers: list[str],
    n: int,
    seed: int = 0,
    threads: int = 4,
    timeout: float = 10.0,
    tally: Tally | None = None,
) -> Tally:
    """``n`` hostile calls spread over every method, from ``threads`` client threads."""
    tally = tally or Tally()
    all_methods = methods(coordinator, workers)
    opts = [
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.max_receive_message_length", 64 << 20),
    ]
    channels = {s: grpc.insecure_channel(s, options=opts) for s in {m.server for m in all_methods}}

    def plan(k: int) -> Iterator[tuple[Method, bytes, bool]]:
        rng = random.Random(seed * 1000 + k)
        for i in range(k, n, threads):
            m = all_methods[i % len(all_methods)]  # every method, in turn
            body, ok = _body(m, rng)
            yield m, body, ok

    def run(k: int) -> None:
        for m, body, ok in plan(k):
            # Health.Watch streams forever: a short deadline ends it
            t = 0.3 if m.path.endswith("/Watch") else timeout
            try:
                _call(channels, m, body, t)
                tally.add(m.path, grpc.StatusCode.OK, "", ok)
            except grpc.RpcError as e:
                tally.add(m.path, e.code(), e.details() or "", ok)

    pool = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    for ch in channels.values():
        ch.close()
    return tally


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):  # noqa: SIM115 -- read at once
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def siege(cluster: Any, n: int, seed: int = 0) -> dict[str, Any]:
    """``n`` hostile calls at ``cluster`` (``tests.cluster.Cluster`` with model "m"
    loaded) while good requests run; the figures the hardening test and bench check."""
    import time

    from pipeserve.v1 import pipeserve_pb2 as pb

    from .models import hf_greedy

    ref = hf_greedy(cluster.small, [3, 4, 5], 8)
    coordinator = cluster.procs[0]
    log = cluster.logs / "coordinator-0.log"
    rss0, log0 = rss_bytes(coordinator.pid), log.stat().st_size
    stop, good = threading.Event(), []

    def traffic() -> None:
        while not stop.is_set():
            try:
                good.append(cluster.generate("m", [3, 4, 5], 8) == ref)
            except grpc.RpcError as e:
                good.append(f"{e.code().name}: {e.details()}")
                time.sleep(0.5)

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    workers = [w.address for w in cluster.status().workers if w.model == "m"]
    t0 = time.monotonic()
    tally = hostile_calls(cluster.address, workers, n, seed=seed)
    seconds = time.monotonic() - t0
    stop.set()
    t.join(120)
    time.sleep(1)
    (model,) = [m for m in cluster.status().models if m.name == "m"]
    return {
        "calls": tally.calls,
        "seconds": seconds,
        "codes": dict(tally.codes),
        "forbidden": tally.bad,
        "alive": all(p.poll() is None for p in cluster.procs),
        "coordinator_rss_mb": (rss0 / 2**20, rss_bytes(coordinator.pid) / 2**20),
        "log_bytes_per_call": (log.stat().st_size - log0) / max(1, tally.calls),
        "good": len(good),
        "good_identical": sum(g is True for g in good),
        "good_other": [g for g in good if g is not True][:5],
        "model_ready": model.state == pb.MODEL_STATE_READY,
    }
