"""Workers on separate hosts form a pipeline: each "host" is a network namespace with its own
address (veth pairs on a bridge the test creates), the coordinator in one, 3 workers in three
others, each bound to and advertising its own address.  Needs root and iproute2; skips with
the reason otherwise.  Everything the test creates is removed, even on failure.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess

import grpc
import pytest

from pipeserve.launch import Processes, wait_status
from pipeserve.v1 import pipeserve_pb2 as pb
from pipeserve.v1 import pipeserve_pb2_grpc as pbg

from .cluster import ROOT, greedy
from .models import lm_model, save_hf

pytestmark = pytest.mark.slow

HOSTS = 4  # coordinator + 3 workers


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create network namespaces")
    tag = f"{os.getpid() % 10000}"
    subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 250)}"
    bridge = f"psbr{tag}"
    made: list[tuple[str, str]] = []  # (kind, name) to remove
    out = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        made.append(("link", bridge))
        _ip("addr", "add", f"{subnet}.254/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i in range(HOSTS):
            ns, veth, peer = f"ps{tag}h{i}", f"ps{tag}v{i}", f"ps{tag}p{i}"
            _ip("netns", "add", ns)
            made.append(("netns", ns))
            _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            made.append(("link", veth))
            _ip("link", "set", peer, "netns", ns)
            _ip("link", "set", veth, "master", bridge)
            _ip("link", "set", veth, "up")
            _ip("-n", ns, "addr", "add", f"{subnet}.{i + 1}/24", "dev", peer)
            _ip("-n", ns, "link", "set", peer, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            out.append((ns, f"{subnet}.{i + 1}", peer))
    except subprocess.CalledProcessError as e:
        _cleanup(made)
        pytest.skip(f"cannot create network namespaces here: {e.stderr.strip()}")
    try:
        yield out
    finally:
        _cleanup(made)


def _cleanup(made: list[tuple[str, str]]) -> None:
    for kind, name in reversed(made):
        args = ["netns", "del", name] if kind == "netns" else ["link", "del", name]
        subprocess.run(["ip", *args], capture_output=True)


def test_pipeline_across_network_namespaces(hosts, tmp_path):
    model = lm_model("llama")
    ckpt = save_hf(model, tmp_path / "llama")
    (cns, caddr, cif), *workers = hosts
    procs = Processes(tmp_path, cwd=ROOT)

    def start(ns: str, ifname: str, *args: str) -> None:
        """``python -m pipeserve ARGS`` inside namespace ``ns``, gloo bound to ``ifname``."""
        procs.start(
            ns, *args, prefix=["ip", "netns", "exec", ns, "env", f"GLOO_SOCKET_IFNAME={ifname}"]
        )

    try:
        start(
            cns,
            cif,
            "coordinator",
            "--host",
            caddr,
            "--port",
            "50051",
            "--advertise-host",
            caddr,
        )
        coord = f"{caddr}:50051"
        ch = grpc.insecure_channel(coord, options=[("grpc.enable_http_proxy", 0)])
        grpc.channel_ready_future(ch).result(timeout=120)
        for ns, addr, ifname in workers:
            start(
                ns,
                ifname,
                "worker",
                "--coordinator",
                coord,
                "--host",
                addr,
                "--port",
                "50061",
                "--advertise-host",
                addr,
            )
        admin, inference = pbg.AdminStub(ch), pbg.InferenceStub(ch)
        status = wait_status(
            admin, lambda st: len(st.workers) >= 3, what="workers did not register"
        )
        assert sorted(w.address for w in status.workers) == sorted(
            f"{addr}:50061" for _, addr, _ in workers
        )
        progress = list(
            admin.LoadModel(
                pb.LoadModelRequest(
                    name="llama", checkpoint=str(ckpt), policy=pb.SplitPolicy(equal_size=3)
                ),
                timeout=300,
            )
        )
        assert progress[-1].state == pb.MODEL_STATE_READY
        prompt = [5, 6, 7, 8, 9]
        req = pb.GenerateRequest(
            model="llama",
            token_ids=pb.TokenIds(ids=prompt),
            max_new_tokens=24,
            sampling=pb.SamplingParameters(ignore_eos=True),
        )
        tokens = [t for r in inference.Generate(req, timeout=120) for t in r.token_ids]
        assert tokens == greedy(model, prompt, 24)
    except BaseException:
        for name in procs.names:
            print(f"--- {name}\n{procs.log(name, tail=3000)}")
        raise
    finally:
        procs.stop(timeout=15)
