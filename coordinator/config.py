"""The coordinator's configuration: every setting in one typed record, built at the edge (the
CLI's flags and the environment's tokens, in :func:`CoordinatorConfig.from_env`); nothing
below reads the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .records import LOST_AFTER_S

__all__ = ["CoordinatorConfig"]


@dataclass(kw_only=True, slots=True)
class CoordinatorConfig:
    host: str = "0.0.0.0"
    """The address to bind (``registry.default_host`` picks it from the guards)."""
    port: int = 50051
    """The gRPC port (0: any free one; :func:`coordinator.server.create_server` says which)."""
    advertise_host: str | None = None
    """The address workers and clients are told (default: ``host``, or the FQDN)."""
    metrics_port: int = 0
    """Prometheus ``/metrics`` port (0: none)."""
    health_port: int = 0
    """Plaintext ``grpc.health.v1`` port for probes that cannot do TLS (0: none)."""
    model_roots: list[str] = field(default_factory=list)
    """Directories checkpoints must lie in (empty: anywhere)."""
    worker_timeout: float = LOST_AFTER_S
    """Seconds without a heartbeat before a worker is lost (``--worker-timeout``)."""
    state_db: str = ""
    """SQLite file keeping the deployments across restarts (empty: none)."""
    max_streams_per_client: int = 0
    """Generate calls one client address may have in flight, over every API (0: any)."""
    worker_token: str = ""
    """Registry calls must carry it (``PIPESERVE_WORKER_TOKEN``; empty: open registration)."""
    client_token: str = ""
    """Client calls must carry it (``PIPESERVE_CLIENT_TOKEN``)."""
    admin_token: str = ""
    """Admin calls must carry it (``PIPESERVE_ADMIN_TOKEN``)."""

    @classmethod
    def from_env(cls, **settings: object) -> CoordinatorConfig:
        """``settings`` plus the tokens from ``PIPESERVE_{WORKER,CLIENT,ADMIN}_TOKEN``."""
        env = os.environ
        tokens = {
            "worker_token": env.get("PIPESERVE_WORKER_TOKEN", ""),
            "client_token": env.get("PIPESERVE_CLIENT_TOKEN", ""),
            "admin_token": env.get("PIPESERVE_ADMIN_TOKEN", ""),
        }
        return cls(**{**tokens, **settings})  # type: ignore[arg-type]
