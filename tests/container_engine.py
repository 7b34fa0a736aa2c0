"""A container engine for tests/test_container.py, offline: the running Docker engine
(``DOCKER_HOST``), else a ``dockerd`` this module starts as root (overlay2 or vfs storage,
its own data root and socket, no bridge network); a Debian base image made with
``mmdebstrap`` (no registry is reachable); the wheels of this interpreter's torch and the
project's dependencies, served to the build on 127.0.0.1 (``docker build --network host``).
Each helper says why it cannot run, for the test to skip with."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

__all__ = [
    "Engine",
    "Unavailable",
    "base_image",
    "free_port",
    "image_size",
    "serve_wheels",
    "start_engine",
]

ROOT = Path(__file__).resolve().parent.parent


class Unavailable(RuntimeError):
    """No engine / tool here: the reason to skip with."""


class Engine:
    """The ``docker`` CLI against one daemon (``host``: a DOCKER_HOST value)."""

    def __init__(self, cli: str, host: str, daemon: subprocess.Popen | None, root: Path | None):
        self.cli, self.host, self.daemon, self.root = cli, host, daemon, root

    def __call__(self, *args: str, timeout: float = 600, check: bool = True, **kw):
        env = {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "1"}
        r = subprocess.run(
            [self.cli, *args], capture_output=True, text=True, timeout=timeout, env=env, **kw
        )
        if check and r.returncode:
            raise AssertionError(f"docker {' '.join(args[:3])}: {r.stderr[-3000:]}")
        return r

    def close(self) -> None:
        if self.daemon is None:
            return
        self.daemon.terminate()
        try:
            self.daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()
        _unmount_under(self.root)
        shutil.rmtree(self.root, ignore_errors=True)


def _unmount_under(root: Path) -> None:
    """dockerd leaves mounts behind (e.g. its netns file): deepest first."""
    prefix = str(root.resolve()) + "/"
    mounts = [ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines()]
    for m in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True)


def _buildkit_cli() -> str:
    """A docker CLI that builds with BuildKit (the Dockerfile bind-mounts): one with buildx,
    or Debian's docker.io client, which has BuildKit built in."""
    seen = []
    for cli in (shutil.which("docker"), "/usr/bin/docker"):
        if not cli or not os.path.exists(cli) or cli in seen:
            continue
        seen.append(cli)
        env = {**os.environ, "DOCKER_BUILDKIT": "1"}
        if subprocess.run([cli, "build", "--help"], capture_output=True, env=env).returncode == 0:
            return cli
    raise Unavailable(f"no docker CLI that builds with BuildKit (tried {seen or 'none'})")


def start_engine(work: Path) -> Engine:
    """The engine at ``DOCKER_HOST`` if it answers, else a dockerd started here (root; its
    own data root, socket and exec root under ``work``; overlay2, else vfs)."""
    cli = _buildkit_cli()
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    probe = subprocess.run(
        [cli, "info"], capture_output=True, env={**os.environ, "DOCKER_HOST": host}
    )
    if probe.returncode == 0:
        return Engine(cli, host, None, None)
    dockerd = shutil.which("dockerd")
    if dockerd is None or os.geteuid() != 0:
        raise Unavailable(
            f"no Docker engine at {host}, and none can start here "
            f"({'no dockerd' if dockerd is None else 'not root'}; .ci/run starts one)"
        )
    for driver in ("overlay2", "vfs"):  # overlay2 where the kernel and disk allow: far faster
        try:
            return _start_dockerd(cli, dockerd, Path(work) / driver, driver)
        except Unavailable as e:
            reason = str(e)
    raise Unavailable(reason)


def _start_dockerd(cli: str, dockerd: str, root: Path, driver: str) -> Engine:
    root.mkdir(parents=True, exist_ok=True)
    sock = root / "docker.sock"
    log = open(root / "dockerd.log", "w")  # noqa: SIM115
    daemon = subprocess.Popen(
        [
            dockerd,
            f"--storage-driver={driver}",
            f"--data-root={root / 'data'}",
            f"--exec-root={root / 'exec'}",
            f"--pidfile={root / 'dockerd.pid'}",
            f"--host=unix://{sock}",
            "--bridge=none",  # containers use the host network only
            "--iptables=false",
            "--ip-masq=false",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    engine = Engine(cli, f"unix://{sock}", daemon, root)
    deadline = time.monotonic() + 60
    while engine("info", check=False, timeout=30).returncode:
        if daemon.poll() is not None or time.monotonic() > deadline:
            tail = (root / "dockerd.log").read_text()[-1500:]
            engine.close()
            raise Unavailable(f"dockerd ({driver}) did not start: {tail}")
        time.sleep(0.5)
    return engine


def base_image(engine: Engine, tag: str = "pipeserve-base:bookworm") -> str:
    """A minimal Debian image with this interpreter's Python minor version (the wheels' ABI),
    python3-venv and tini, from Debian's archive (``mmdebstrap`` -> ``docker import``)."""
    if engine("image", "inspect", tag, check=False).returncode == 0:
        return tag
    if sys.version_info[:2] != (3, 11):
        raise Unavailable("the Debian base has Python 3.11; this interpreter's wheels differ")
    if shutil.which("mmdebstrap") is None:
        raise Unavailable("no mmdebstrap to make a base image (apt-get install mmdebstrap)")
    strap = subprocess.Popen(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,tini",
            "--dpkgopt=path-exclude=/usr/share/{doc,man,locale,info}/*",
            "bookworm",
            "-",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    env = {**os.environ, "DOCKER_HOST": engine.host}
    imp = subprocess.run(
        [engine.cli, "import", "-", tag], stdin=strap.stdout, capture_output=True, env=env
    )
    assert strap.stdout is not None
    strap.stdout.close()
    err = strap.stderr.read().decode()[-2000:] if strap.stderr else ""
    if strap.wait() or imp.returncode:
        raise AssertionError(f"base image: {err} {imp.stderr.decode()[-1000:]}")
    return tag


def _requirements() -> list[str]:
    import torch

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = f"torch=={torch.__version__.split('+')[0]}"
    return [pin, *(d for d in deps if not d.startswith("torch"))]


def serve_wheels(folder: Path) -> tuple[str, http.server.ThreadingHTTPServer]:
    """Download every wheel the image needs (as this machine's pip resolves them: torch is the
    CPU wheel on disk) into ``folder`` and serve it on 127.0.0.1; the URL for ``WHEELS``."""
    pip = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:"]
    r = subprocess.run(
        [*pip, "--dest", str(folder), *_requirements()],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if r.returncode:
        raise AssertionError(f"pip download: {r.stderr[-2000:]}")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/", server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_size(engine: Engine, tag: str) -> int:
    return int(json.loads(engine("image", "inspect", tag).stdout)[0]["Size"])
