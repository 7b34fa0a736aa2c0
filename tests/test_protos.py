"""The checked-in generated gRPC code matches protos/ (run protos/generate.py after edits)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current():
    r = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_message_carries_pickled_or_tensor_payloads():
    """gRPC carries control only: the bytes fields of pipeserve.v1 are the size-limited
    Forward tensor and the rendezvous records, and nothing is named
    pickle/state_dict/activation."""
    from pipeserve.v1 import pipeserve_pb2

    bytes_fields = []
    for msg in pipeserve_pb2.DESCRIPTOR.message_types_by_name.values():
        for f in msg.fields:
            assert not any(w in f.name for w in ("pickle", "state_dict", "activation"))
            if f.type == f.TYPE_BYTES:
                bytes_fields.append(f"{msg.name}.{f.name}")
    assert sorted(bytes_fields) == [
        "StoreSetRequest.value",
        "StoreWaitResponse.values",
        "Tensor.data",
    ]
