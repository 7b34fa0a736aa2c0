"""The data-plane rendezvous over the coordinator's gRPC Registry store.

``torch.distributed`` process groups meet through a key-value ``Store``; this one keeps the
keys on the coordinator (``Registry.StoreSet/StoreWait/StoreAdd``), so the rendezvous needs no
extra port, is bound to the coordinator's address, and is covered by its TLS and worker token.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch.distributed as dist

from pipeserve.v1 import pipeserve_pb2 as pb

__all__ = ["CoordinatorStore"]


class CoordinatorStore(dist.Store):
    """A c10d ``Store`` whose keys live on the coordinator.  ``prefixed(p)`` scopes keys
    (torch's ``PrefixStore`` cannot wrap a Python store, so scoping is done here)."""

    def __init__(
        self, stub: Any, metadata: Any = None, timeout_s: float = 300.0, prefix: str = ""
    ) -> None:
        super().__init__()
        self.stub = stub
        self.md = metadata
        self.timeout_s = timeout_s
        self.prefix = prefix

    def prefixed(self, prefix: str) -> CoordinatorStore:
        return CoordinatorStore(self.stub, self.md, self.timeout_s, f"{self.prefix}{prefix}/")

    def clone(self) -> CoordinatorStore:
        return CoordinatorStore(self.stub, self.md, self.timeout_s, self.prefix)

    def set(self, key: str, value: bytes | str) -> None:
        data = value if isinstance(value, bytes) else value.encode()
        self.stub.StoreSet(
            pb.StoreSetRequest(key=self.prefix + key, value=data), metadata=self.md, timeout=60
        )

    def get(self, key: str) -> bytes:
        r = self._wait([key], self.timeout_s)
        if not r.found:
            raise TimeoutError(f"rendezvous key {key!r} not set after {self.timeout_s:.0f}s")
        return r.values[0]

    def add(self, key: str, amount: int) -> int:
        r = self.stub.StoreAdd(
            pb.StoreAddRequest(key=self.prefix + key, amount=amount), metadata=self.md, timeout=60
        )
        return r.value

    def check(self, keys: list[str]) -> bool:
        return self._wait(keys, 0).found

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        t = timeout.total_seconds() if timeout is not None else self.timeout_s
        if not self._wait(keys, t).found:
            raise TimeoutError(f"rendezvous keys {keys} not set after {t:.0f}s")

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        self.timeout_s = timeout.total_seconds()

    def _wait(self, keys: list[str], timeout_s: float) -> Any:
        full = [self.prefix + k for k in keys]
        return self.stub.StoreWait(
            pb.StoreWaitRequest(keys=full, timeout_s=timeout_s),
            metadata=self.md,
            timeout=timeout_s + 60,
        )
