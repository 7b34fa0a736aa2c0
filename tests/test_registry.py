"""The coordinator's Registry without processes: the rendezvous store is bounded, every bad
call gets a real status code (never UNKNOWN), registration needs the worker's control token,
the token guards every call when set, and open registration binds 127.0.0.1 loudly."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
import pytest

from coordinator.core import Coordinator
from coordinator.registry import RegistryServicer, default_host
from coordinator.rendezvous import MAX_KEYS, MAX_STORE_BYTES, MAX_VALUE_BYTES
from pipeserve import rpc
from pipeserve.v1 import pipeserve_pb2 as pb


class Aborted(Exception):
    pass


class Ctx:
    """A servicer context: ``abort`` raises as gRPC's does."""

    def __init__(self, metadata: tuple = ()) -> None:
        self.md = metadata

    def invocation_metadata(self) -> tuple:
        return self.md

    def is_active(self) -> bool:
        return True

    def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise Aborted(code, message)


def _code(fn) -> grpc.StatusCode:
    try:
        fn()
    except Aborted as e:
        return e.args[0]
    return grpc.StatusCode.OK


@pytest.fixture
def coord() -> Coordinator:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    return Coordinator(rpc.Health(server))


def test_store_is_bounded(coord):
    reg, ctx = RegistryServicer(coord), Ctx()
    big = pb.StoreSetRequest(key="k", value=b"x" * (MAX_VALUE_BYTES + 1))
    assert _code(lambda: reg.StoreSet(big, ctx)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not coord.store.kv  # nothing kept
    assert _code(lambda: reg.StoreSet(pb.StoreSetRequest(key="x" * 2000), ctx)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    # total bytes: 1 MiB values until the store is full, then refused; replacing is fine
    value = b"v" * MAX_VALUE_BYTES
    n = MAX_STORE_BYTES // MAX_VALUE_BYTES
    for i in range(n):
        reg.StoreSet(pb.StoreSetRequest(key=f"m/1/{i}", value=value), ctx)
    assert coord.store.nbytes == n * MAX_VALUE_BYTES
    assert _code(lambda: reg.StoreSet(pb.StoreSetRequest(key="more", value=value), ctx)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    reg.StoreSet(pb.StoreSetRequest(key="m/1/0", value=b"small"), ctx)
    assert coord.store.nbytes == (n - 1) * MAX_VALUE_BYTES + 5
    # a re-formed model's old epochs are pruned: the bytes come back
    reg.StoreSet(pb.StoreSetRequest(key="m/2/a", value=b"new"), ctx)
    coord.prune_store("m", keep_epoch=2)
    assert coord.store.kv == {"m/2/a": b"new"} and coord.store.nbytes == 3
    # number of keys
    for i in range(MAX_KEYS - 1):
        coord.store.kv[f"k{i}"] = b""
    assert _code(lambda: reg.StoreSet(pb.StoreSetRequest(key="last", value=b""), ctx)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )


def test_bad_store_calls_get_real_codes(coord):
    reg, ctx = RegistryServicer(coord), Ctx()
    reg.StoreSet(pb.StoreSetRequest(key="text", value=b"not a number"), ctx)
    add = pb.StoreAddRequest(key="text", amount=1)
    assert _code(lambda: reg.StoreAdd(add, ctx)) == grpc.StatusCode.FAILED_PRECONDITION
    assert reg.StoreAdd(pb.StoreAddRequest(key="n", amount=5), ctx).value == 5
    assert reg.StoreAdd(pb.StoreAddRequest(key="n", amount=-7), ctx).value == -2
    big = pb.StoreAddRequest(key="n", amount=2**63 - 1)
    reg.StoreAdd(big, ctx)
    assert _code(lambda: reg.StoreAdd(big, ctx)) == grpc.StatusCode.OUT_OF_RANGE
    nan = pb.StoreWaitRequest(keys=["absent"], timeout_s=float("nan"))
    assert not reg.StoreWait(nan, ctx).found
    assert _code(lambda: reg.StoreWait(pb.StoreWaitRequest(keys=[""]), ctx)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_register_needs_control_token_and_bounded_address(coord):
    reg, ctx = RegistryServicer(coord), Ctx()
    assert _code(lambda: reg.Register(pb.RegisterRequest(address="h:1"), ctx)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    long = pb.RegisterRequest(address="h" * 10_000, control_token="t")
    assert _code(lambda: reg.Register(long, ctx)) == grpc.StatusCode.INVALID_ARGUMENT
    r = reg.Register(pb.RegisterRequest(address="h:1", control_token="t"), ctx)
    assert r.worker_id in coord.workers and len(coord.workers) == 1


def test_worker_token_guards_every_registry_call(coord):
    reg = RegistryServicer(coord, token="s3cret")
    calls = [
        lambda c: reg.Register(pb.RegisterRequest(address="h:1", control_token="t"), c),
        lambda c: reg.StoreSet(pb.StoreSetRequest(key="k", value=b"1"), c),
        lambda c: reg.StoreAdd(pb.StoreAddRequest(key="k", amount=1), c),
        lambda c: reg.StoreWait(pb.StoreWaitRequest(keys=["k"]), c),
        lambda c: reg.Heartbeat(pb.HeartbeatRequest(worker_id="w1"), c),
    ]
    wrong = Ctx((("authorization", "Bearer nope"),))
    for call in calls:
        assert _code(lambda call=call: call(Ctx())) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda call=call: call(wrong)) == grpc.StatusCode.PERMISSION_DENIED
    assert not coord.workers and not coord.store.kv
    good = Ctx((("authorization", "Bearer s3cret"),))
    for call in calls:
        assert _code(lambda call=call: call(good)) == grpc.StatusCode.OK


def test_open_registration_binds_loopback_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        assert default_host(None, mutual_tls=False, worker_token=False) == "127.0.0.1"
    assert "registration is OPEN" in caplog.text
    assert default_host("0.0.0.0", mutual_tls=False, worker_token=False) == "0.0.0.0"  # kept
    assert default_host(None, mutual_tls=True, worker_token=False) == "0.0.0.0"
    caplog.clear()
    assert default_host(None, mutual_tls=False, worker_token=True) == "0.0.0.0"
    assert "OPEN" not in caplog.text
