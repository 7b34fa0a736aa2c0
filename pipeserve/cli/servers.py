"""``pipeserve coordinator | worker | certs``: run the cluster's servers (settings from the
flags and the environment, passed in), and make development TLS certificates."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any

from pipeserve.cli.flags import (
    add_observability_flags,
    apply_tls,
    log_level,
    stage_options_from_env,
)

__all__ = ["add_server_commands"]


def cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator.config import CoordinatorConfig
    from coordinator.registry import default_host
    from coordinator.server import serve
    from pipeserve.observe import setup_logging

    setup_logging(log_level("INFO"), args.log_format)
    tls = apply_tls(args)
    config = CoordinatorConfig.from_env(
        port=args.port,
        advertise_host=args.advertise_host,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        model_roots=args.model_root or [],
        worker_timeout=args.worker_timeout,
        state_db=args.state_db,
        max_streams_per_client=args.max_streams_per_client,
    )
    config.host = default_host(
        args.host, mutual_tls=bool(tls.ca), worker_token=bool(config.worker_token)
    )
    serve(config, stop=_stop_on_sigterm())
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import torch

    from pipeline_core import EngineLimits
    from pipeline_core.split import parse_size
    from pipeserve.observe import setup_logging
    from stage_worker.job import DATAPLANE_TIMEOUT_S
    from stage_worker.server import serve

    setup_logging(log_level("INFO"), args.log_format)
    apply_tls(args)
    if args.threads:  # else torch takes every core of the node, whatever the pod's CPU limit
        torch.set_num_threads(args.threads)
    serve(
        args.coordinator,
        stop=_stop_on_sigterm(),
        leave_on_stop=True,
        worker_id=args.worker_id,
        host=args.host,
        port=args.port,
        device=args.device,
        advertise_host=args.advertise_host,
        limits=EngineLimits(max_tokens=args.max_kv_tokens, max_sequences=args.max_sequences),
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        speed_gflops=args.speed,
        memory_bytes=parse_size(args.memory) if args.memory else 0,
        worker_token=os.environ.get("PIPESERVE_WORKER_TOKEN", ""),
        dataplane_timeout=float(
            os.environ.get("PIPESERVE_DATAPLANE_TIMEOUT", str(DATAPLANE_TIMEOUT_S))
        ),
        options=stage_options_from_env(),
    )
    # [Note: exiting a worker] its stage has moved away (or was given up); threads of the
    # abandoned stage may still block on the dead data plane until PIPESERVE_DATAPLANE_TIMEOUT,
    # and gloo aborts the process if they are torn down at interpreter exit: leave now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _stop_on_sigterm() -> threading.Event:
    """An event SIGTERM sets (``docker stop``, Kubernetes): the server stops taking work,
    a worker moves its stage to a spare, and the process exits."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:  # set off the signal handler's frame
        threading.Thread(target=stop.set, name="sigterm").start()

    signal.signal(signal.SIGTERM, handler)
    return stop


def cmd_certs(args: argparse.Namespace) -> int:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        print(
            "error: pipeserve certs needs the [tls] extra (the cryptography package): "
            "pip install 'pipeserve[tls]', or use openssl / your PKI",
            file=sys.stderr,
        )
        return 2
    from pipeserve.certs import make_certs

    hosts = [h for h in (args.hosts or "").split(",") if h]
    out = make_certs(args.out, hosts)
    print(f"wrote {out}/ca.pem, server.pem/.key (servers), client.pem/.key (clients)")
    return 0


def add_server_commands(sub: Any) -> None:
    p = sub.add_parser("coordinator", help="run the coordinator (gRPC)")
    p.add_argument(
        "--host",
        help="address to bind (default 0.0.0.0 when PIPESERVE_WORKER_TOKEN or mutual TLS "
        "guards registration, else 127.0.0.1)",
    )
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--advertise-host", help="host name this coordinator reports")
    p.add_argument(
        "--worker-timeout",
        type=float,
        default=5.0,
        help="seconds without a heartbeat before a worker is lost and its stage moves to a spare",
    )
    p.add_argument(
        "--max-streams-per-client",
        type=int,
        default=0,
        help="generations one client address may have in flight, by pipeserve.v1 or KServe "
        "(0: no limit); an HTTP gateway is one client: size it for the gateway's users",
    )
    p.add_argument(
        "--state-db",
        default="",
        help="SQLite file for deployments: a restarted coordinator restores its models",
    )
    p.add_argument(
        "--model-root",
        action="append",
        metavar="DIR",
        help="checkpoints must lie under this directory (repeatable; default: anywhere)",
    )
    add_observability_flags(p)
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("worker", help="run a stage worker (gRPC)")
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--advertise-host", help="host the coordinator uses to reach this worker")
    p.add_argument("--max-kv-tokens", type=int, default=65536, help="stage 0: KV budget in tokens")
    p.add_argument("--max-sequences", type=int, default=256, help="stage 0: sequences at once")
    p.add_argument(
        "--speed", type=float, default=0.0, help="GFLOP/s to report (default: measured at start)"
    )
    p.add_argument("--memory", help="memory to offer stages, e.g. 20GiB (default: the device's)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default, every core; set it to the CPU limit)",
    )
    p.add_argument(
        "--worker-id",
        default="",
        help="id to register under, e.g. a StatefulSet pod name (default: one is given)",
    )
    add_observability_flags(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("certs", help="make development TLS certificates (CA, server, client)")
    p.add_argument("--out", default="certs")
    p.add_argument("--hosts", help="extra host names / IPs for the server certificate")
    p.set_defaults(func=cmd_certs)
