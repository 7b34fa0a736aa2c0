"""``pipeserve gateway --coordinator HOST:PORT --port 8000``."""

from __future__ import annotations

import argparse
import os
from typing import Any

__all__ = ["add_gateway_command"]


def cmd_gateway(args: argparse.Namespace) -> int:
    from pipeserve import rpc
    from pipeserve.gateway.server import GatewayConfig, serve
    from pipeserve.observe import setup_logging

    setup_logging(os.environ.get("PIPESERVE_LOG", "INFO"), args.log_format)
    env = rpc.TLS.from_env()
    tls = rpc.TLS(
        ca=args.tls_ca or env.ca, cert=args.tls_cert or env.cert, key=args.tls_key or env.key
    )
    tokenizers = {}
    for item in args.tokenizer or []:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise SystemExit(f"--tokenizer wants MODEL=DIR, got {item!r}")
        tokenizers[name] = directory
    serve(
        GatewayConfig(
            coordinator=args.coordinator,
            host=args.host,
            port=args.port,
            tls=tls,
            tokenizers=tokenizers,
            request_timeout=args.request_timeout,
            log_level=os.environ.get("PIPESERVE_LOG", "INFO").lower(),
        )
    )
    return 0


def add_gateway_command(sub: Any) -> None:
    p = sub.add_parser(
        "gateway", help="OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)"
    )
    p.add_argument("--coordinator", default="127.0.0.1:50051", metavar="HOST:PORT")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (also serves /metrics)")
    p.add_argument(
        "--tokenizer",
        action="append",
        metavar="MODEL=DIR",
        help="where MODEL's tokenizer is, if not readable at its checkpoint path (repeatable)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        metavar="S",
        help="deadline of each generation in seconds (HTTP 504 past it; default none)",
    )
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument("--tls-ca", help="CA that signs the coordinator. Env: PIPESERVE_TLS_CA")
    p.add_argument("--tls-cert", help="client certificate (mTLS). Env: PIPESERVE_TLS_CERT")
    p.add_argument("--tls-key", help="its private key. Env: PIPESERVE_TLS_KEY")
    p.set_defaults(func=cmd_gateway)
