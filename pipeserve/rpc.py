"""The shared gRPC kit, under one name: ``from pipeserve import rpc`` gives every piece the
coordinator, the stage workers, the gateway and the command line share.

Each concept lives in its own module; this one re-exports them:

* ``transport``: servers (health + reflection registered, bytes counted) and channels, message
  limits, ``host_port``, ``remaining`` (a call's deadline);
* ``tls``: ``TLS`` and the process-wide ``configure_tls``;
* ``auth``: bearer tokens (``BearerAuth`` on servers, ``with_token`` on channels);
* ``health``: ``grpc.health.v1`` that never blocks its caller;
* ``status``: ``abort_for``, the one mapping from exceptions to status codes, and ``clip``;
* ``codec``: proto <-> domain (sampling, workload, split policy, tensors).
"""

from __future__ import annotations

from pipeserve.auth import BearerAuth, bearer_error, with_token
from pipeserve.codec import (
    check_generate,
    policy_from_proto,
    policy_to_proto,
    sampling_from_proto,
    tensor_from_bytes,
    tensor_from_proto,
    tensor_to_proto,
    workload_from_proto,
    workload_to_proto,
)
from pipeserve.health import NOT_SERVING, SERVICE_UNKNOWN, SERVING, Health
from pipeserve.status import ECHO_CHARS, abort_for, clip
from pipeserve.tls import TLS, configure_tls, current_tls
from pipeserve.transport import (
    CHANNEL_OPTIONS,
    MAX_MESSAGE_BYTES,
    SERVER_THREADS,
    ByteCounter,
    channel,
    host_port,
    make_server,
    remaining,
    serve_health_only,
)

__all__ = [
    "CHANNEL_OPTIONS",
    "ECHO_CHARS",
    "MAX_MESSAGE_BYTES",
    "NOT_SERVING",
    "SERVER_THREADS",
    "SERVICE_UNKNOWN",
    "SERVING",
    "TLS",
    "BearerAuth",
    "ByteCounter",
    "Health",
    "abort_for",
    "bearer_error",
    "channel",
    "check_generate",
    "clip",
    "configure_tls",
    "current_tls",
    "host_port",
    "make_server",
    "policy_from_proto",
    "policy_to_proto",
    "remaining",
    "sampling_from_proto",
    "serve_health_only",
    "tensor_from_bytes",
    "tensor_from_proto",
    "tensor_to_proto",
    "with_token",
    "workload_from_proto",
    "workload_to_proto",
]
