"""The gateway as deployed: its Kubernetes manifests agree with the code, and it talks to a
coordinator under (mutual) TLS."""

from __future__ import annotations

import subprocess
import sys

import httpx2 as httpx  # the HTTP client the openai package ships with
import pytest

from .gateway_local import ROOT, free_port, wait_ready


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_k8s_gateway_manifests_match_the_code(overlay):
    """The gateway Deployment's flags parse, its ports, probes and NetworkPolicy agree with
    the code, it reaches the coordinator's Service, and it mounts the models read-only (for
    tokenizers) and the TLS Secret where the env vars point."""
    sys.path.insert(0, str(ROOT / "deploy"))
    from render import render

    from pipeserve.cli import build_parser
    from pipeserve.gateway import Backend, create_app

    docs = render(ROOT / "deploy" / "k8s" / "overlays" / overlay)

    def one(kind: str, name: str) -> dict:
        (d,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
        return d

    dep = one("Deployment", "pipeserve-gateway")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(c["args"])
    assert args.cmd == "gateway"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": args.port}
    coord = one("Service", "pipeserve-coordinator")
    assert args.coordinator == f"{coord['metadata']['name']}:{coord['spec']['ports'][0]['port']}"
    svc = one("Service", "pipeserve-gateway")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(args.port, "http")]
    paths = {r.path for r in create_app(Backend("127.0.0.1:1")).routes}
    assert {c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]} <= paths
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in paths
    assert int(annotations["prometheus.io/port"]) == args.port
    policy = one("NetworkPolicy", "pipeserve-gateway")
    assert policy["spec"]["podSelector"] == dep["spec"]["selector"]
    assert [p["port"] for r in policy["spec"]["ingress"] for p in r["ports"]] == [args.port]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["models"]["readOnly"] is True and mounts["models"]["mountPath"] == "/models"
    env = {e["name"]: e.get("value") for e in c["env"]}
    for var in ("PIPESERVE_TLS_CA", "PIPESERVE_TLS_CERT", "PIPESERVE_TLS_KEY"):
        assert env[var].startswith(mounts["tls"]["mountPath"] + "/"), var
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})


@pytest.mark.slow
def test_tls_to_the_coordinator(tmp_path):
    """A coordinator under mutual TLS: the gateway with the CA and a client certificate
    lists its models; without a client certificate, or in plaintext, it cannot (503)."""
    from pipeserve.certs import make_certs

    certs = make_certs(tmp_path / "certs")
    port = free_port()
    tls = ["--tls-ca", str(certs / "ca.pem")]
    client = [*tls, "--tls-cert", str(certs / "client.pem"), "--tls-key", str(certs / "client.key")]
    server = [*tls, "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key")]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeserve",
                "coordinator",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *server,
            ],
            cwd=ROOT,
        )
    ]
    try:
        urls = []
        for flags in (client, tls, []):  # mTLS, TLS without a client certificate, plaintext
            http = free_port()
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "pipeserve",
                        "gateway",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(http),
                        "--coordinator",
                        f"127.0.0.1:{port}",
                        *flags,
                    ],
                    cwd=ROOT,
                )
            )
            urls.append(f"http://127.0.0.1:{http}")
        wait_ready(int(urls[0].rsplit(":", 1)[1]))
        r = httpx.get(f"{urls[0]}/v1/models", timeout=30)
        assert r.status_code == 200 and r.json() == {"object": "list", "data": []}
        for url in urls[1:]:
            wait_ready(int(url.rsplit(":", 1)[1]), want=503)
            r = httpx.get(f"{url}/v1/models", timeout=30)
            assert r.status_code == 503 and "UNAVAILABLE" in r.json()["error"]["message"]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
