"""Deployment files: every kustomize overlay renders, validates offline against the Kubernetes
schemas and yamllint, and agrees with the code (ports, health services, flags, env vars)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = ["cpu", "gpu"]
GATEWAY_PORT = 8000
sys.path.insert(0, str(DEPLOY))

from render import render  # noqa: E402


def _docs(overlay: str) -> list[dict]:
    return render(DEPLOY / "k8s" / "overlays" / overlay)


def _one(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _key(d: dict) -> tuple[str, str]:
    return d["kind"], d["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    import kubernetes_validate

    docs = _docs(overlay)
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == sorted(
        {
            "ConfigMap",
            "PersistentVolumeClaim",
            "Deployment",
            "Service",
            "StatefulSet",
            "Job",
            "NetworkPolicy",
            "PodDisruptionBudget",
        }
    )
    version = kubernetes_validate.latest_version()
    for d in docs:
        kubernetes_validate.validate(d, version, strict=True)  # raises on any schema error
    kubectl = shutil.which("kubectl")
    if kubectl:  # our offline renderer agrees with the real kustomize
        out = subprocess.run(
            [kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        real = sorted(yaml.safe_load_all(out), key=_key)
        assert sorted(docs, key=_key) == real


def test_yamllint():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(file=str(DEPLOY / ".yamllint.yaml"))
    problems = []
    for f in sorted(DEPLOY.rglob("*.yaml")):
        problems += [f"{f}:{p.line}: {p.message}" for p in linter.run(f.read_text(), conf)]
    assert not problems, problems


def _container(doc: dict) -> dict:
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    return c


def _args(container: dict, config: dict) -> list[str]:
    """The container's args with $(VAR) expanded from its env / ConfigMap (as Kubernetes does;
    fieldRef values are left as placeholders)."""
    values = dict(config)
    for e in container.get("env", []):
        values[e["name"]] = e.get("value", f"<{e['name']}>")
    return [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in container["args"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_match_the_code(overlay):
    from coordinator.server import SERVICES
    from pipeserve.cli import build_parser
    from pipeserve.env import ENV_VARS, THIRD_PARTY_PREFIXES
    from stage_worker.server import SERVICE as WORKER_SERVICE

    docs = _docs(overlay)
    parser = build_parser()
    config = _one(docs, "ConfigMap", "pipeserve-config")["data"]
    coord_dep = _one(docs, "Deployment", "pipeserve-coordinator")
    coord_svc = _one(docs, "Service", "pipeserve-coordinator")
    workers = _one(docs, "StatefulSet", "pipeserve-worker")
    workers_svc = _one(docs, "Service", "pipeserve-workers")
    job = _one(docs, "Job", "pipeserve-load-model")

    cc = _container(coord_dep)
    ca = parser.parse_args(_args(cc, config))  # every flag exists in the CLI
    ports = {p["name"]: p["containerPort"] for p in cc["ports"]}
    assert ca.cmd == "coordinator"
    assert ports == {"grpc": ca.port, "health": ca.health_port}
    svc_ports = {p["name"]: p["port"] for p in coord_svc["spec"]["ports"]}
    assert svc_ports == {"grpc": ca.port}  # the rendezvous is served on the same port
    assert cc["readinessProbe"]["grpc"] == {"port": ca.health_port, "service": SERVICES[0]}
    assert cc["livenessProbe"]["grpc"] == {"port": ca.health_port}
    assert ca.model_root == ["/models"]
    assert ca.advertise_host == coord_svc["metadata"]["name"]

    wc = _container(workers)
    wa = parser.parse_args(_args(wc, config))
    assert wa.cmd == "worker" and {p["name"]: p["containerPort"] for p in wc["ports"]} == {
        "grpc": wa.port,
        "health": wa.health_port,
    }
    host, port = wa.coordinator.rsplit(":", 1)
    assert (host, int(port)) == (coord_svc["metadata"]["name"], ca.port)
    assert wc["readinessProbe"]["grpc"] == {"port": wa.health_port, "service": WORKER_SERVICE}
    assert wc["livenessProbe"]["grpc"] == {"port": wa.health_port}
    assert workers["spec"]["serviceName"] == workers_svc["metadata"]["name"]
    assert workers_svc["spec"]["clusterIP"] == "None"
    assert workers["spec"]["podManagementPolicy"] == "Parallel"
    assert wa.device == ("cuda" if overlay == "gpu" else "cpu")
    if overlay == "gpu":
        assert wc["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"NCCL_SOCKET_IFNAME"} <= {e["name"] for e in wc["env"]}

    jc = _container(job)
    ja = parser.parse_args(_args(jc, config))
    assert (ja.cmd, ja.action, ja.coordinator) == ("admin", "load", wa.coordinator)
    assert ja.target == config["MODEL_DIR"] and ja.balanced == int(config["STAGES"])

    # env: ours are read by the code; others are torch/NCCL/gloo networking or used in args
    used_in_args = {
        m for c in (cc, wc, jc) for a in c["args"] for m in re.findall(r"\$\((\w+)\)", a)
    }
    for c in (cc, wc, jc):
        for e in c.get("env", []):
            n = e["name"]
            assert n in ENV_VARS or n.startswith(THIRD_PARTY_PREFIXES) or n in used_in_args, n
    for key in config:
        assert key in ENV_VARS or key in used_in_args, key
    # network policies open exactly the ports the containers serve
    policy_ports = {
        p["port"]
        for d in docs
        if d["kind"] == "NetworkPolicy"
        for rule in d["spec"]["ingress"]
        for p in rule.get("ports", [])
    }
    assert policy_ports == {ca.port, wa.port, GATEWAY_PORT}  # the gateway: tests/test_gateway.py
    for d in (coord_dep, workers, job):
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        c = _container(d)
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["limits"]["memory"]
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["models"]["readOnly"] is True
        # TLS material from the Secret, where the env vars the code reads point
        env = {e["name"]: e.get("value") for e in c["env"]}
        tls_dir = mounts["tls"]["mountPath"]
        for var in ("PIPESERVE_TLS_CA", "PIPESERVE_TLS_CERT", "PIPESERVE_TLS_KEY"):
            assert env[var].startswith(tls_dir + "/"), var
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["tls"]["secret"]["secretName"] == "pipeserve-tls"


def test_dockerfile_layers_and_user():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    deps = next(i for i, ln in enumerate(lines) if "requirements.txt" in ln)
    source = next(i for i, ln in enumerate(lines) if ln.startswith("COPY pipeline_core"))
    assert deps < source  # dependencies in a layer below the source
    assert re.search(r"^USER 10001", text, re.M) and 'ENTRYPOINT ["pipeserve"]' in text
    assert "safetensors" not in text.split("COPY")[-1]
    assert "ARG TORCH_INDEX" in text  # CPU by default, CUDA by build argument


def test_docker_image_builds():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "info"], capture_output=True).returncode:
        pytest.skip("no Docker engine on this machine (the image build needs one)")
    r = subprocess.run(
        [
            docker,
            "build",
            "-f",
            str(DEPLOY / "docker" / "Dockerfile"),
            "-t",
            "pipeserve:test",
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
