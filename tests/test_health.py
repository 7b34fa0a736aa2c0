"""``grpc.health.v1`` as pipeserve serves it: a watcher that never reads cannot block the
process setting its health (a worker's heartbeat loop does, every beat), Watch follows
changes, List lists, and an unknown service's NOT_FOUND says what exists."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pipeserve import rpc

H = health_pb2.HealthCheckResponse


@pytest.fixture
def served():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    health = rpc.Health(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield health, health_pb2_grpc.HealthStub(ch), f"127.0.0.1:{port}"
    ch.close()
    server.stop(0)


def test_a_watcher_that_never_reads_blocks_nobody(served):
    """With grpc's own servicer, ``set`` blocked for good after ~9,400 changes once such a
    watcher's flow-control window was full (a fixed-window client, as here)."""
    health, stub, target = served
    health.set("svc", True)
    # a channel whose flow-control window does not grow (no BDP probing)
    ch = grpc.insecure_channel(target, options=[("grpc.http2.bdp_probe", 0)])
    stalled = health_pb2_grpc.HealthStub(ch).Watch(
        health_pb2.HealthCheckRequest(service="svc"), timeout=60
    )  # never read
    done = threading.Event()

    def flip() -> None:
        for k in range(20_000):  # past the stream's flow-control window
            health.set("svc", k % 2 == 0)
        done.set()

    threading.Thread(target=flip, daemon=True).start()
    assert done.wait(20), "set() blocked behind a watcher that does not read"
    stalled.cancel()
    ch.close()
    r = stub.Check(health_pb2.HealthCheckRequest(service="svc"), timeout=5)
    assert r.status == H.NOT_SERVING


def test_watch_list_and_check(served):
    health, stub, _ = served
    health.set("svc", True)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="svc"), timeout=30)
    assert next(watch).status == H.SERVING
    health.set("svc", False)
    assert next(watch).status == H.NOT_SERVING
    watch.cancel()
    unknown = stub.Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
    assert next(unknown).status == H.SERVICE_UNKNOWN
    unknown.cancel()
    listed = stub.List(health_pb2.HealthListRequest(), timeout=5).statuses
    assert {k: v.status for k, v in listed.items()} == {"": H.SERVING, "svc": H.NOT_SERVING}
    with pytest.raises(grpc.RpcError) as e:
        stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "'svc'" in e.value.details()
