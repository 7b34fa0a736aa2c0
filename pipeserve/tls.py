"""TLS for every gRPC server and client of a process: certificate paths, credentials, and the
process-wide setting the command line configures once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["TLS", "configure_tls", "current_tls"]


@dataclass
class TLS:
    """TLS for every gRPC server and client of this process (all empty: plaintext).

    ``cert``/``key``: this process's certificate (servers serve with it; under mTLS it is
    also presented as a client).  ``ca``: the CA that signs peers: clients verify servers
    with it, and a server given a CA *requires* client certificates (mutual TLS).  Clients
    verify the name ``server_name`` (every pipeserve server certificate carries it).
    """

    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = "pipeserve"

    @classmethod
    def from_env(cls) -> TLS:
        return cls(
            ca=os.environ.get("PIPESERVE_TLS_CA", ""),
            cert=os.environ.get("PIPESERVE_TLS_CERT", ""),
            key=os.environ.get("PIPESERVE_TLS_KEY", ""),
        )

    @property
    def enabled(self) -> bool:
        return bool(self.ca or self.cert)

    @staticmethod
    def _read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    def server_credentials(self) -> grpc.ServerCredentials:
        if not (self.cert and self.key):
            raise ValueError("a TLS server needs a certificate and a key (--tls-cert/--tls-key)")
        ca = self._read(self.ca)
        return grpc.ssl_server_credentials(
            [(self._read(self.key), self._read(self.cert))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.ca),
            private_key=self._read(self.key),
            certificate_chain=self._read(self.cert),
        )


_TLS = TLS()


def configure_tls(tls: TLS) -> None:
    """Set this process's TLS for ``transport.make_server`` and ``transport.channel`` (the
    command line does, from its flags and the environment)."""
    global _TLS
    _TLS = tls


def current_tls() -> TLS:
    """This process's TLS (plaintext until :func:`configure_tls`)."""
    return _TLS
