"""``pipeserve gateway``: run the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pipeserve import rpc
from pipeserve.gateway.app import create_app
from pipeserve.gateway.backend import Backend

__all__ = ["GatewayConfig", "serve"]

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class GatewayConfig:
    coordinator: str = "127.0.0.1:50051"
    """host:port of the coordinator's ``pipeserve.v1`` API."""
    host: str = "0.0.0.0"
    port: int = 8000
    tls: rpc.TLS = field(default_factory=rpc.TLS)
    """TLS (or mutual TLS) to the coordinator; all empty: plaintext."""
    tokenizers: dict[str, str] = field(default_factory=dict)
    """Model name -> directory with its tokenizer, where the gateway cannot read the
    checkpoint at the path the workers use."""
    request_timeout: float | None = None
    """Deadline of each Generate call in seconds (expired: HTTP 504); None: no deadline."""
    log_level: str = "info"


def _fastest(module: str) -> str:
    """uvicorn's C-accelerated ``module`` when it imports, else "auto" (pure Python):
    httptools parses and frames HTTP/1.1 with less CPU per streamed chunk than h11, and
    uvloop runs the event loop (every chunk's wake-ups) on libuv."""
    try:
        __import__(module)
    except ImportError:
        log.warning("%s is not installed: the gateway uses more CPU per token", module)
        return "auto"
    return module


def serve(cfg: GatewayConfig) -> None:
    """Serve until interrupted (blocking)."""
    import uvicorn

    backend = Backend(cfg.coordinator, cfg.tls, cfg.tokenizers, cfg.request_timeout)
    app = create_app(backend)
    log.info("OpenAI API on http://%s:%d/v1 -> coordinator %s", cfg.host, cfg.port, cfg.coordinator)
    uvicorn.run(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
        backlog=4096,
        http=_fastest("httptools"),
        loop=_fastest("uvloop"),
    )
