"""Deployment files: every kustomize overlay renders, validates offline against the Kubernetes
schemas and yamllint, and agrees with the code (ports, health services, flags, env vars)."""

from __future__ import annotations

import math
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


def _cpus(quantity: str) -> int:
    """A CPU quantity as ``resourceFieldRef`` gives it with divisor 1: rounded up."""
    q = str(quantity)
    return math.ceil(int(q[:-1]) / 1000) if q.endswith("m") else math.ceil(float(q))


def _args(container: dict, config: dict) -> list[str]:
    """The container's args with $(VAR) expanded from its env / ConfigMap (as Kubernetes does:
    a CPU limit's resourceFieldRef rounded up; fieldRef values are left as placeholders)."""
    values = dict(config)
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("resourceFieldRef")
        if ref and ref["resource"] == "limits.cpu":
            assert ref["containerName"] == container["name"]
            values[e["name"]] = str(_cpus(container["resources"]["limits"]["cpu"]))
        else:
            values[e["name"]] = e.get("value", f"<{e['name']}>")
    return [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in container["args"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_match_the_code(overlay):
    from coordinator.server import SERVICES
    from pipeserve.cli import build_parser
    from pipeserve.env import ENV_VARS, THIRD_PARTY_PREFIXES
    from stage_worker.lifecycle import REGISTERED
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
    assert ports == {"grpc": ca.port, "health": ca.health_port, "metrics": ca.metrics_port}
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
        "metrics": wa.metrics_port,
    }
    host, port = wa.coordinator.rsplit(":", 1)
    assert (host, int(port)) == (coord_svc["metadata"]["name"], ca.port)
    # Ready = alive and registered (spares too), not "serving a stage" (WORKER_SERVICE)
    assert wc["readinessProbe"]["grpc"] == {"port": wa.health_port, "service": REGISTERED}
    assert WORKER_SERVICE != REGISTERED
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
    # the gateway: tests/test_gateway.py
    assert policy_ports == {ca.port, wa.port, ca.metrics_port, wa.metrics_port, GATEWAY_PORT}
    for d in (coord_dep, workers, job):
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        c = _container(d)
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["limits"]["memory"]
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        if d is not job:  # the Job only sends a path
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
    source = next(i for i, ln in enumerate(lines) if ln.startswith("COPY . /app/"))
    assert deps < source  # dependencies in a layer below the source
    assert re.search(r"^USER 10001", text, re.M)
    # PID 1 forwards SIGTERM (docker stop, Kubernetes) to pipeserve, which drains
    assert 'ENTRYPOINT ["tini", "--", "python", "-m", "pipeserve"]' in text
    assert "safetensors" not in text.split("COPY")[-1]
    assert "ARG TORCH_INDEX" in text  # CPU by default, CUDA by build argument
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "*" in ignore  # everything excluded, then only what the image runs:
    assert {"!pipeline_core/", "!stage_worker/", "!coordinator/", "!pipeserve/"} <= set(ignore)


# ---------------------------------------------------------------------------------------------
# what an SRE would trip over at run time (issue 22, item 3), on the rendered overlays


def _pod(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_readable_by_the_pods_user_only(overlay):
    docs = _docs(overlay)
    for kind, name in [
        ("Deployment", "pipeserve-coordinator"),
        ("StatefulSet", "pipeserve-worker"),
        ("Job", "pipeserve-load-model"),
        ("Deployment", "pipeserve-gateway"),
    ]:
        spec = _pod(_one(docs, kind, name))
        sc = spec["securityContext"]
        # a Secret volume's files are root:fsGroup; uid 10001 reads them through its group
        assert sc["fsGroup"] == sc["runAsGroup"] == 10001 and sc["runAsUser"] == 10001, name
        for v in spec["volumes"]:
            if "secret" in v:
                mode = v["secret"]["defaultMode"]
                assert mode & 0o040 and not mode & 0o007, (name, oct(mode))
    job = _pod(_one(docs, "Job", "pipeserve-load-model"))
    assert "models" not in {v["name"] for v in job["volumes"]}  # the coordinator reads it
    for kind, name in [("Job", "pipeserve-load-model"), ("Deployment", "pipeserve-gateway")]:
        client = _one(docs, kind, name)
        vols = {v["name"]: v for v in _pod(client)["volumes"]}
        files = {i["path"] for i in vols["tls"]["secret"]["items"]}
        assert files == {"ca.pem", "client.pem", "client.key"}, name  # never the servers' key
        env = _env(_container(client))
        for var in ("PIPESERVE_TLS_CA", "PIPESERVE_TLS_CERT", "PIPESERVE_TLS_KEY"):
            assert env[var]["value"].rsplit("/", 1)[1] in files, (name, var)
    for kind, name in [
        ("Deployment", "pipeserve-coordinator"),
        ("StatefulSet", "pipeserve-worker"),
    ]:
        c = _container(_one(docs, kind, name))
        tls = {v["name"]: v for v in _pod(_one(docs, kind, name))["volumes"]}["tls"]
        files = {i["path"] for i in tls["secret"]["items"]}
        for var in ("PIPESERVE_TLS_CA", "PIPESERVE_TLS_CERT", "PIPESERVE_TLS_KEY"):
            assert _env(c)[var]["value"].rsplit("/", 1)[1] in files, (name, var)


def test_models_volume_binds_and_can_be_filled():
    import kubernetes_validate

    pvc = _one(_docs("cpu"), "PersistentVolumeClaim", "pipeserve-models")["spec"]
    # no default StorageClass (most cannot provide ROX; a new volume would be empty)
    assert pvc["storageClassName"] == "" and pvc["accessModes"] == ["ReadOnlyMany"]
    nfs = render(DEPLOY / "k8s" / "models-nfs")
    version = kubernetes_validate.latest_version()
    for d in nfs:
        kubernetes_validate.validate(d, version, strict=True)
    pv = _one(nfs, "PersistentVolume", pvc["volumeName"])["spec"]
    assert pv["storageClassName"] == "" and "ReadOnlyMany" in pv["accessModes"]
    assert pv["claimRef"]["name"] == "pipeserve-models" and pv["nfs"]["readOnly"] is True
    rw_pv = _one(nfs, "PersistentVolume", "pipeserve-models-rw")["spec"]
    assert rw_pv["nfs"] == {k: v for k, v in pv["nfs"].items() if k != "readOnly"}  # same export
    rw = _one(nfs, "PersistentVolumeClaim", "pipeserve-models-rw")["spec"]
    assert rw["storageClassName"] == "" and rw["volumeName"] == "pipeserve-models-rw"
    job = _one(nfs, "Job", "pipeserve-populate-models")
    (mount,) = [m for m in _container(job)["volumeMounts"] if m["name"] == "models"]
    (vol,) = [v for v in _pod(job)["volumes"] if v["name"] == "models"]
    assert vol["persistentVolumeClaim"]["claimName"] == "pipeserve-models-rw"
    assert not mount.get("readOnly")
    model_dir = _one(_docs("cpu"), "ConfigMap", "pipeserve-config")["data"]["MODEL_DIR"]
    assert f'local_dir="{model_dir}"' in " ".join(_container(job)["command"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_coordinator_state_survives_a_restart(overlay):
    docs = _docs(overlay)
    dep = _one(docs, "Deployment", "pipeserve-coordinator")
    c = _container(dep)
    db = _flag(c["args"], "state-db")
    (mount,) = [m for m in c["volumeMounts"] if db.startswith(m["mountPath"] + "/")]
    assert not mount.get("readOnly")
    (vol,) = [v for v in _pod(dep)["volumes"] if v["name"] == mount["name"]]
    claim = _one(docs, "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert dep["spec"]["strategy"]["type"] == "Recreate"  # one pod holds the volume at a time


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_spares_are_ready_and_evictions_drain(overlay):
    from coordinator.server import STOP_GRACE_S
    from stage_worker.lifecycle import DRAIN_TIMEOUT_S, REGISTERED

    docs = _docs(overlay)
    sts = _one(docs, "StatefulSet", "pipeserve-worker")
    assert _container(sts)["readinessProbe"]["grpc"]["service"] == REGISTERED
    stages = int(_one(docs, "ConfigMap", "pipeserve-config")["data"]["STAGES"])
    assert sts["spec"]["replicas"] == stages + 1  # a spare to drain to
    pdb = _one(docs, "PodDisruptionBudget", "pipeserve-workers")["spec"]
    assert pdb["maxUnavailable"] == 1 and pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    # SIGTERM: the worker drains within DRAIN_TIMEOUT_S, then stops its servers (2 s + 1 s)
    assert _pod(sts)["terminationGracePeriodSeconds"] >= DRAIN_TIMEOUT_S + 5
    dep = _one(docs, "Deployment", "pipeserve-coordinator")
    assert _pod(dep)["terminationGracePeriodSeconds"] >= STOP_GRACE_S + 5
    assert sts["spec"]["updateStrategy"] == {"type": "OnDelete"}  # no old/new mix


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_are_served_discovered_and_admitted(overlay):
    docs = _docs(overlay)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    for kind, name in [
        ("Deployment", "pipeserve-coordinator"),
        ("StatefulSet", "pipeserve-worker"),
    ]:
        d = _one(docs, kind, name)
        c = _container(d)
        port = int(_flag(c["args"], "metrics-port"))
        assert {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"] == port
        ann = d["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == port
        labels = d["spec"]["template"]["metadata"]["labels"]
        (policy,) = [
            p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        ]
        scrape = [
            r
            for r in policy["spec"]["ingress"]
            if any(p["port"] == port for p in r.get("ports", []))
        ]
        assert scrape and all("namespaceSelector" in f for r in scrape for f in r["from"]), name
        (pm,) = render(DEPLOY / "k8s" / "monitoring")
        assert pm["kind"] == "PodMonitor" and pm["apiVersion"] == "monitoring.coreos.com/v1"
        assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} == {"metrics", "http"}
    gateway = _container(_one(docs, "Deployment", "pipeserve-gateway"))
    assert {p["name"] for p in gateway["ports"]} == {"http"}  # /metrics rides on the API port


def test_gpu_overlay_places_and_images():
    docs = _docs("gpu")
    for kind, name in [("Deployment", "pipeserve-coordinator"), ("Job", "pipeserve-load-model")]:
        assert _container(_one(docs, kind, name))["image"].endswith(":cpu"), name  # CPU nodes
    sts = _one(docs, "StatefulSet", "pipeserve-worker")
    assert _container(sts)["image"].endswith(":gpu")
    aff = _pod(sts)["affinity"]
    anti = aff["podAntiAffinity"]
    assert "preferredDuringSchedulingIgnoredDuringExecution" not in anti
    (term,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]  # one stage per node
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= labels.items()
    (zone,) = aff["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert zone["topologyKey"] == "topology.kubernetes.io/zone"  # one pipeline, one zone
    assert zone["labelSelector"]["matchLabels"].items() <= labels.items()
    # the CUDA wheel index named for the GPU image has a torch 2.13 build (PyPI: CUDA 13.0)
    text = (DEPLOY / "docker" / "Dockerfile").read_text() + (
        ROOT / "docs" / "deploy.md"
    ).read_text()
    assert "TORCH_INDEX=https://pypi.org/simple" in text
    assert not re.search(r"TORCH_INDEX=\S*/whl/cu12", text)  # no torch 2.13 build there


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_threads_ids_and_addresses(overlay):
    from pipeserve.cli import build_parser
    from pipeserve.rpc import host_port

    docs = _docs(overlay)
    config = _one(docs, "ConfigMap", "pipeserve-config")["data"]
    c = _container(_one(docs, "StatefulSet", "pipeserve-worker"))
    wa = build_parser().parse_args(_args(c, config))
    assert wa.threads == _cpus(c["resources"]["limits"]["cpu"]) >= 1  # not every node core
    assert _flag(c["args"], "worker-id") == "$(POD_NAME)"
    assert _env(c)["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert _flag(c["args"], "advertise-host") == "$(POD_IP)"
    assert host_port("fd00::1", 50061) == "[fd00::1]:50061"  # an IPv6 pod IP, bracketed
    assert host_port("[fd00::1]", 1) == "[fd00::1]:1" and host_port("10.0.0.1", 1) == "10.0.0.1:1"
