"""The command line as a client of a coordinator: stubs that carry the tokens from the
environment, and a failed call reported on one line."""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["report_rpc_error", "stubs"]


def stubs(address: str) -> tuple[Any, Any]:
    """``(AdminStub, InferenceStub)`` to ``address``; admin calls carry
    ``PIPESERVE_ADMIN_TOKEN`` and client calls ``PIPESERVE_CLIENT_TOKEN`` when set."""
    from pipeserve import rpc
    from pipeserve.v1 import pipeserve_pb2_grpc as pbg

    ch = rpc.channel(address)
    admin_ch = rpc.with_token(ch, os.environ.get("PIPESERVE_ADMIN_TOKEN", ""))
    client_ch = rpc.with_token(ch, os.environ.get("PIPESERVE_CLIENT_TOKEN", ""))
    return pbg.AdminStub(admin_ch), pbg.InferenceStub(client_ch)


def report_rpc_error(e: Any) -> int:
    """Print a failed call's status code and message (stderr); exit status 2."""
    print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
    return 2
