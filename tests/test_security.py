"""Security of the control plane: mutual TLS on every server and client, admin and worker
tokens, plaintext health for probes; and checkpoints never execute pickled code."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pipeline_core import CheckpointError, CheckpointIndex, read_tensors
from pipeserve.certs import make_certs
from pipeserve.v1 import pipeserve_pb2 as pb
from pipeserve.v1 import pipeserve_pb2_grpc as pbg

from .cluster import code as _code
from .cluster import greedy as _greedy
from .cluster import port as _port
from .models import lm_model, save_hf

ROOT = Path(__file__).resolve().parent.parent


def _secure(address: str, certs: Path, client: bool = True) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / "client.key").read_bytes() if client else None,
        certificate_chain=(certs / "client.pem").read_bytes() if client else None,
    )
    return grpc.secure_channel(
        address, creds, options=[("grpc.ssl_target_name_override", "pipeserve")]
    )


@pytest.mark.slow
def test_mtls_tokens_and_refused_workers(tmp_path):
    certs = make_certs(tmp_path / "certs")
    model = lm_model("llama")  # a long context: the held streams below last seconds
    save_hf(model, tmp_path / "gpt2")
    port, health_port = _port(), _port()
    address = f"127.0.0.1:{port}"
    tls = [
        "--tls-ca",
        str(certs / "ca.pem"),
        "--tls-cert",
        str(certs / "server.pem"),
        "--tls-key",
        str(certs / "server.key"),
    ]
    env = {
        **os.environ,
        "PIPESERVE_ADMIN_TOKEN": "adm1n",
        "PIPESERVE_WORKER_TOKEN": "w0rker",
        "PIPESERVE_CLIENT_TOKEN": "cl1ent",
    }

    def start(*args: str, **extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeserve", *args],
            cwd=ROOT,
            env={**env, **extra},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    common = ["--host", "127.0.0.1", "--advertise-host", "127.0.0.1", *tls]
    procs = [
        start(
            "coordinator",
            "--port",
            str(port),
            "--health-port",
            str(health_port),
            "--max-streams-per-client",
            "2",
            *common,
        )
    ]
    try:
        ch = _secure(address, certs)
        grpc.channel_ready_future(ch).result(timeout=120)
        procs.append(start("worker", "--coordinator", address, *common))
        procs.append(
            start("worker", "--coordinator", address, *common, PIPESERVE_WORKER_TOKEN="wrong")
        )  # a stray process
        admin, inference = pbg.AdminStub(ch), pbg.InferenceStub(ch)
        auth = (("authorization", "Bearer adm1n"),)
        deadline = time.monotonic() + 120
        while not admin.ClusterStatus(pb.ClusterStatusRequest(), metadata=auth).workers:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(3)  # the stray worker has had time to try
        assert len(admin.ClusterStatus(pb.ClusterStatusRequest(), metadata=auth).workers) == 1

        code, msg = _code(lambda: admin.ClusterStatus(pb.ClusterStatusRequest()))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "PIPESERVE_ADMIN_TOKEN" in msg
        code, _ = _code(
            lambda: admin.ClusterStatus(
                pb.ClusterStatusRequest(), metadata=(("authorization", "Bearer nope"),)
            )
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED

        list(
            admin.LoadModel(
                pb.LoadModelRequest(checkpoint=str(tmp_path / "gpt2")), metadata=auth, timeout=300
            )
        )
        req = pb.GenerateRequest(
            model="gpt2",
            token_ids=pb.TokenIds(ids=[3, 4, 5]),
            max_new_tokens=12,
            sampling=pb.SamplingParameters(ignore_eos=True),
        )
        client = (("authorization", "Bearer cl1ent"),)
        code, _ = _code(lambda: list(inference.Generate(req, timeout=60)))
        assert code == grpc.StatusCode.UNAUTHENTICATED  # the client API wants its token
        got = [
            t for r in inference.Generate(req, timeout=120, metadata=client) for t in r.token_ids
        ]
        assert got == _greedy(model, [3, 4, 5], 12)  # over mTLS, coordinator <-> worker too
        # no client certificate / no TLS at all: the server refuses the connection
        for bad in (_secure(address, certs, client=False), grpc.insecure_channel(address)):
            stub = pbg.InferenceStub(bad)
            code, _ = _code(lambda s=stub: list(s.Generate(req, timeout=10, metadata=client)))
            assert code == grpc.StatusCode.UNAVAILABLE
        # Kubernetes probes: plaintext health on its own port
        h = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{health_port}"))
        status = h.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pipeserve-pwned",))


def test_malicious_pickle_in_bin_checkpoint_is_not_executed(tmp_path):
    """`.bin` shards load with weights_only=True: a pickle that would run code is refused."""
    marker = Path("/tmp/pipeserve-pwned")
    marker.unlink(missing_ok=True)
    path = tmp_path / "ckpt"
    path.mkdir()
    torch.save({"w": _Evil()}, path / "pytorch_model.bin")  # a zip checkpoint, like HF's
    with pytest.raises(CheckpointError, match="weights_only"):
        read_tensors(CheckpointIndex.open(path), {"w": ("w", [1], torch.float32)})
    with open(path / "pytorch_model.bin", "wb") as f:  # and a legacy plain pickle
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(CheckpointError):
        read_tensors(CheckpointIndex.open(path), {"w": ("w", [1], torch.float32)})
    assert not marker.exists()


def test_load_paths_are_confined_to_model_roots(tmp_path):
    from coordinator.placement import confined

    root = tmp_path / "models"
    (root / "llama").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (root / "link").symlink_to(tmp_path / "secret")
    assert confined(str(root / "llama"), [root])
    assert not confined(str(root / "llama" / ".." / ".." / "secret"), [root])
    assert not confined(str(root / "link"), [root])  # a symlink out of the root
    assert not confined("/etc", [root])
    assert confined("/etc", [])  # no roots configured: anything


def test_per_client_stream_limit():
    """--max-streams-per-client: the third concurrent Generate from one address is refused
    with RESOURCE_EXHAUSTED, also when it comes by KServe (which relays through the same
    coordinator.relay.Relay); another address and a freed slot are served."""
    import threading as th

    from coordinator.core import Coordinator
    from coordinator.edge import client_call
    from coordinator.errors import LimitReached
    from coordinator.relay import Relay
    from coordinator.server import InferenceServicer

    release = th.Event()

    class Health:
        def set(self, service, serving):
            pass

    class Held(Relay):  # the limit under test; the relaying itself is held
        def _relay(self, request, call, method):
            yield pb.GenerateResponse(token_ids=[1])
            release.wait(30)

    class Aborted(Exception):
        pass

    class Ctx:
        def __init__(self, peer):
            self._peer = peer

        def peer(self):
            return self._peer

        def invocation_metadata(self):
            return ()

        def send_initial_metadata(self, md):
            pass

        def abort(self, code, message):
            raise Aborted(code, message)

    coord = Coordinator(Health(), max_streams_per_client=2)
    relay = Held(coord, None, lambda r: None)
    svc = InferenceServicer(coord, relay)

    a = [svc.Generate(pb.GenerateRequest(), Ctx("ipv4:10.0.0.1:1000")) for _ in range(2)]
    for g in a:
        next(g)  # two streams in flight from 10.0.0.1
    with pytest.raises(Aborted) as e:
        next(svc.Generate(pb.GenerateRequest(), Ctx("ipv4:10.0.0.1:2000")))
    code, message = e.value.args
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "in flight" in message
    kserve_call = client_call(Ctx("ipv4:10.0.0.1:2001"))
    kserve = relay.generate(pb.GenerateRequest(), kserve_call, "ModelInfer")
    with pytest.raises(LimitReached, match="in flight"):
        next(kserve)
    other = svc.Generate(pb.GenerateRequest(), Ctx("ipv4:10.0.0.2:1000"))
    assert next(other).token_ids == [1]  # another client is not affected
    release.set()
    for g in [*a, other]:
        list(g)  # finish: the slots are freed
    again = svc.Generate(pb.GenerateRequest(), Ctx("ipv4:10.0.0.1:3000"))
    assert next(again).token_ids == [1]
    list(again)
    assert not coord.client_streams  # every slot freed, no address kept


def test_dev_certs_name_loopback_by_ip(tmp_path):
    """`grpcurl 127.0.0.1:PORT` verifies the server certificate without -servername."""
    from cryptography import x509

    certs = make_certs(tmp_path, hosts=["10.1.2.3", "coord.example"])
    cert = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert ips == {"127.0.0.1", "::1", "10.1.2.3"}
    names = set(sans.get_values_for_type(x509.DNSName))
    assert {"pipeserve", "localhost", "coord.example"} <= names


def test_worker_advertises_the_address_it_binds():
    import socket

    from stage_worker.server import _advertised

    assert _advertised("127.0.0.1") == "127.0.0.1"  # was the machine's hostname
    assert _advertised("0.0.0.0") == socket.gethostname()
