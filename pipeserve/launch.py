"""Starting pipeserve's own processes on this machine: ``python -m pipeserve ...`` children
with their output in one log file each, free ports, and waiting for them to be ready.

``pipeserve local`` uses it, and so does the test and benchmark harness (``tests/cluster.py``):
one way to start a coordinator, workers and a gateway as separate processes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Processes", "free_port", "wait_gateway", "wait_status"]

LOOPBACK = ["--host", "127.0.0.1", "--advertise-host", "127.0.0.1"]
"""Server flags that keep a process on this machine (bound to, and reachable at, loopback)."""


def free_port(prefer: int = 0, host: str = "127.0.0.1") -> int:
    """``prefer`` when it is free on ``host`` (0: none preferred), else any free port."""
    with socket.socket() as s:
        try:
            s.bind((host, prefer))
        except OSError:
            s.bind((host, 0))
        return s.getsockname()[1]


class Processes:
    """``python -m pipeserve`` children started together and stopped together.

    Each writes stdout and stderr to ``log_dir/<name>.log``; ``env`` is added to this process's
    environment (``PYTHONUNBUFFERED`` is always set, so logs are current); ``prefix`` runs the
    command under another (``ip netns exec NS env VAR=...``).
    """

    def __init__(
        self,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd
        self.procs: list[subprocess.Popen] = []
        self.names: list[str] = []

    def start(
        self,
        name: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> subprocess.Popen:
        """Start ``python -m pipeserve ARGS`` logging to ``<name>.log``."""
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 -- lives as long as the child
        try:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "pipeserve", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env={**self.env, **(env or {})},
            )
        finally:
            log.close()  # the child holds its own copy
        self.procs.append(proc)
        self.names.append(name)
        return proc

    def log(self, name: str, tail: int = 0) -> str:
        """The log of ``name`` (its last ``tail`` characters; 0: all)."""
        text = (self.log_dir / f"{name}.log").read_text(errors="replace")
        return text[-tail:] if tail else text

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM every child, then SIGKILL those still running after ``timeout``."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=timeout)


def wait_status(
    admin: Any, ok: Callable[[Any], bool], timeout: float = 120, what: str = "the cluster"
) -> Any:
    """Poll ``admin.ClusterStatus`` until ``ok(status)``; the status (TimeoutError after
    ``timeout`` seconds, saying ``what`` did not happen)."""
    from pipeserve.v1 import pipeserve_pb2 as pb

    deadline = time.monotonic() + timeout
    while True:
        status = admin.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)
        if ok(status):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f} s: {status}")
        time.sleep(0.2)


def wait_gateway(port: int, log_dir: Path, timeout: float = 120) -> str:
    """The gateway's base URL once its ``/ready`` answers 200 (raises TimeoutError)."""
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=5) as r:
                if r.status == 200:
                    return url
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gateway did not start on port {port}; see {log_dir}")
        time.sleep(0.2)
