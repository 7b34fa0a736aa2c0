"""The image, built from ``deploy/docker/Dockerfile`` and run in a real container engine the
way the Kubernetes manifests run it: a coordinator, 3 workers and a spare as containers (host
network only: every address is 127.0.0.1; read-only root filesystem; uid 10001; TLS files
root:10001 mode 0440 as ``fsGroup`` makes a Secret; the models volume read-only; a writable
state volume for the coordinator's ``--state-db``).  The model is loaded by the ``admin
load`` command the Job runs, in a container; generated tokens equal ``generate``; ``docker
stop`` of a stage worker (SIGTERM through tini) moves its stage to the spare with every
stream intact and exits in < 10 s; ``docker stop`` + ``start`` of the coordinator brings the
model back from ``--state-db`` without a reload.

Needs a Docker engine (``DOCKER_HOST``; ``.ci/run`` starts one) or root with ``dockerd`` (this
test starts one), and ``mmdebstrap`` for the base image; skipped with the reason otherwise.
Set ``PIPESERVE_CONTAINER_REPORT=FILE`` to get the measured figures as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import grpc
import pytest

from pipeserve import rpc
from pipeserve.certs import make_certs
from pipeserve.v1 import pipeserve_pb2 as pb
from pipeserve.v1 import pipeserve_pb2_grpc as pbg

from .container_engine import (
    Unavailable,
    base_image,
    free_port,
    image_size,
    serve_wheels,
    start_engine,
)
from .fleet import run_streams, stream_into
from .models import hf_greedy_batch, lm_model, save_hf

pytestmark = [pytest.mark.slow, pytest.mark.container]

ROOT = Path(__file__).resolve().parent.parent
TAG = "pipeserve:container-test"
UID = "10001"
NEW = 24
TOKENS = {"PIPESERVE_ADMIN_TOKEN": "admin-secret", "PIPESERVE_WORKER_TOKEN": "worker-secret"}
TLS_ENV = {
    "PIPESERVE_TLS_CA": "/etc/pipeserve/tls/ca.pem",
    "PIPESERVE_TLS_CERT": "/etc/pipeserve/tls/tls.pem",
    "PIPESERVE_TLS_KEY": "/etc/pipeserve/tls/tls.key",
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    try:
        eng = start_engine(Path(f"/var/tmp/pipeserve-dockerd-{os.getpid()}"))
    except Unavailable as e:
        pytest.skip(str(e))
    yield eng
    eng.close()


def _secret(src: Path, dest: Path, role: str) -> Path:
    """A Secret volume as Kubernetes mounts it with ``defaultMode: 0440`` and ``fsGroup:
    10001``: root-owned files the pod's group (only) can read."""
    dest.mkdir(parents=True)
    for name, to in [("ca.pem", "ca.pem"), (f"{role}.pem", "tls.pem"), (f"{role}.key", "tls.key")]:
        shutil.copy(src / name, dest / to)
        os.chown(dest / to, 0, int(UID))
        os.chmod(dest / to, 0o440)
    os.chmod(dest, 0o755)
    return dest


def _run(engine, name: str, *args: str, volumes: list[str], rm=False, detach=True, timeout=600.0):
    flags = ["--network", "host", "--read-only", "--tmpfs", "/tmp", "--user", f"{UID}:{UID}"]
    flags += ["--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    for k, v in {**TOKENS, **TLS_ENV, "PIPESERVE_LOG": "INFO", "GLOO_SOCKET_IFNAME": "lo"}.items():
        flags += ["-e", f"{k}={v}"]
    for v in volumes:
        flags += ["-v", v]
    mode = ["-d"] if detach else []
    rm_ = ["--rm"] if rm else []
    return engine("run", *mode, *rm_, "--name", name, *flags, TAG, *args, timeout=timeout)


def _stop(engine, name: str) -> tuple[float, int]:
    """``docker stop`` (SIGTERM, SIGKILL after 30 s): seconds taken and the exit code."""
    t0 = time.monotonic()
    engine("stop", "-t", "30", name, timeout=120)
    took = time.monotonic() - t0
    code = int(engine("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip())
    return took, code


def test_image_runs_the_cluster(engine, tmp_path):
    figures: dict[str, float] = {}
    t0 = time.monotonic()
    base = base_image(engine)
    figures["base_image_s"] = time.monotonic() - t0
    wheels, server = serve_wheels(tmp_path / "wheels")
    figures["wheels_s"] = time.monotonic() - t0 - figures["base_image_s"]
    names: list[str] = []
    admin_md = (("authorization", f"Bearer {TOKENS['PIPESERVE_ADMIN_TOKEN']}"),)
    try:
        t0 = time.monotonic()
        engine(
            "build",
            "--network",
            "host",
            "-f",
            str(ROOT / "deploy" / "docker" / "Dockerfile"),
            "--build-arg",
            f"PYTHON_IMAGE={base}",
            "--build-arg",
            f"WHEELS={wheels}",
            "-t",
            TAG,
            str(ROOT),
            timeout=1800,
        )
        figures["build_s"] = time.monotonic() - t0
        figures["image_bytes"] = image_size(engine, TAG)
        server.shutdown()

        model = lm_model("llama")
        models = tmp_path / "models"
        save_hf(model, models / "m")
        os.chmod(tmp_path, 0o755)
        for p in [models, *models.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        certs = make_certs(tmp_path / "certs")
        server_tls = _secret(certs, tmp_path / "tls-server", "server")
        client_tls = _secret(certs, tmp_path / "tls-client", "client")
        state = tmp_path / "state"
        state.mkdir()
        os.chown(state, int(UID), int(UID))
        ro_models = f"{models}:/models:ro"

        port = free_port()
        address = f"127.0.0.1:{port}"
        common = ["--host", "127.0.0.1"]
        names.append("ps-coordinator")
        _run(
            engine,
            "ps-coordinator",
            "coordinator",
            *common,
            "--port",
            str(port),
            "--model-root",
            "/models",
            "--state-db",
            "/var/lib/pipeserve/state.db",
            "--worker-timeout",
            "3",
            volumes=[
                ro_models,
                f"{server_tls}:/etc/pipeserve/tls:ro",
                f"{state}:/var/lib/pipeserve",
            ],
        )
        for k in range(4):  # 3 stages + 1 spare
            names.append(f"ps-worker-{k}")
            _run(
                engine,
                f"ps-worker-{k}",
                "worker",
                *common,
                "--coordinator",
                address,
                "--port",
                str(free_port()),
                "--advertise-host",
                "127.0.0.1",
                "--worker-id",
                f"ps-worker-{k}",
                "--threads",
                "1",
                volumes=[ro_models, f"{server_tls}:/etc/pipeserve/tls:ro"],
            )

        rpc.configure_tls(
            rpc.TLS(
                ca=str(certs / "ca.pem"),
                cert=str(certs / "client.pem"),
                key=str(certs / "client.key"),
            )
        )
        ch = rpc.channel(address)
        grpc.channel_ready_future(ch).result(timeout=180)
        admin, inference = pbg.AdminStub(ch), pbg.InferenceStub(ch)

        def status() -> pb.ClusterStatusResponse:
            return admin.ClusterStatus(pb.ClusterStatusRequest(), timeout=10, metadata=admin_md)

        def wait(ok, timeout: float = 300) -> None:
            deadline = time.monotonic() + timeout
            while not ok():
                assert time.monotonic() < deadline, status()
                time.sleep(0.3)

        wait(lambda: sum(w.state == "idle" for w in status().workers) == 4)
        # the load Job's command, in a container: the client certificate only, no models volume
        t0 = time.monotonic()
        _run(
            engine,
            "ps-load",
            "admin",
            "load",
            "/models/m",
            "--name",
            "m",
            "--stages",
            "3",
            "--coordinator",
            address,
            volumes=[f"{client_tls}:/etc/pipeserve/tls:ro"],
            rm=True,
            detach=False,
            timeout=600,
        )
        figures["load_s"] = time.monotonic() - t0

        prompts = [[1 + i, 2 + i % 7, 3, 4 + i % 5] for i in range(8)]
        want = [hf_greedy_batch(model, [p], NEW)[0] for p in prompts]

        def stream(prompt: list[int], out: list[int], errors: list) -> None:
            stream_into(inference, prompt, out, errors, NEW)

        def many(after) -> tuple[list[list[int]], list, object]:
            return run_streams(stream, prompts, after, wait_s=120)

        outs, errors, _ = many(lambda: None)
        assert not errors and outs == want  # tokens equal single-process generate

        # docker stop a stage worker: SIGTERM -> tini -> pipeserve moves its stage to the spare
        (victim,) = [w.id for w in status().workers if w.model == "m" and w.stage == 1]
        outs, errors, (took, code) = many(lambda: _stop(engine, victim))
        figures["worker_stop_s"] = took
        assert code == 0 and took < 10, (took, code)
        assert not errors and outs == want, errors[:3]
        st = status()
        assert victim not in {w.id for w in st.workers}
        assert sorted(w.id for w in st.workers if w.model == "m") == sorted(
            n for n in names if n.startswith("ps-worker") and n != victim
        )

        # docker stop + start the coordinator: the model comes back from --state-db
        took, code = _stop(engine, "ps-coordinator")
        figures["coordinator_stop_s"] = took
        assert code == 0 and took < 10, (took, code)
        engine("start", "ps-coordinator")
        grpc.channel_ready_future(ch).result(timeout=180)
        t0 = time.monotonic()

        def ready() -> bool:
            try:
                models_ = inference.ListModels(pb.ListModelsRequest(), timeout=10).models
            except grpc.RpcError:
                return False
            return any(m.name == "m" and m.state == pb.MODEL_STATE_READY for m in models_)

        wait(ready, 120)
        figures["coordinator_restore_s"] = time.monotonic() - t0
        out: list[int] = []
        stream(prompts[0], out, errors)
        assert not errors and out == want[0]
    finally:
        rpc.configure_tls(rpc.TLS())
        server.shutdown()
        logs = {}
        for n in names:
            r = engine("logs", "--tail", "40", n, check=False)
            logs[n] = r.stdout + r.stderr
        for n in names:
            engine("rm", "-f", n, check=False)
        engine("rmi", "-f", TAG, check=False)
        engine("builder", "prune", "-af", check=False)
        print(json.dumps(figures, indent=1))
        if report := os.environ.get("PIPESERVE_CONTAINER_REPORT"):
            Path(report).write_text(json.dumps(figures, indent=1))
        if os.environ.get("PIPESERVE_CONTAINER_LOGS"):
            print(json.dumps(logs, indent=1))
