"""The data plane's rendezvous: a key-value store the workers of a ring meet in (keys
``model/epoch/...``), served on the coordinator's port by ``Registry.Store*``.  Bounded in key
and value sizes, number of keys and total bytes, so a caller cannot grow the coordinator's
memory."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .errors import InvalidRequest, LimitReached, NotReady, OutOfRange, clip

__all__ = ["MAX_KEYS", "MAX_KEY_BYTES", "MAX_STORE_BYTES", "MAX_VALUE_BYTES", "Rendezvous"]

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 1 << 20
"""Rendezvous values are addresses and small JSON records; nothing near this."""
MAX_KEYS = 10_000
MAX_STORE_BYTES = 16 << 20
MAX_WAIT_KEYS = 1024
MAX_WAIT_S = 600.0


class Rendezvous:
    """Keys and values under the coordinator's condition (waiters wake on every change)."""

    def __init__(self, changed: threading.Condition) -> None:
        self.changed = changed
        self.kv: dict[str, bytes] = {}
        self.nbytes = 0

    @staticmethod
    def _check_key(key: str) -> None:
        if not key or len(key.encode()) > MAX_KEY_BYTES:
            raise InvalidRequest(
                f"a rendezvous key has 1 to {MAX_KEY_BYTES} bytes (got {len(key.encode())})"
            )

    def _put(self, key: str, value: bytes) -> None:
        """Store ``key`` (the caller holds the lock); LimitReached past the bounds."""
        old = len(self.kv[key]) if key in self.kv else None
        used = self.nbytes - (old or 0) + len(value)
        if old is None and len(self.kv) >= MAX_KEYS:
            raise LimitReached(f"the rendezvous store holds {MAX_KEYS} keys (the limit)")
        if used > MAX_STORE_BYTES:
            raise LimitReached(
                f"the rendezvous store would hold {used} bytes; at most {MAX_STORE_BYTES}"
            )
        self.kv[key] = value
        self.nbytes = used
        self.changed.notify_all()

    def set(self, key: str, value: bytes) -> None:
        self._check_key(key)
        if len(value) > MAX_VALUE_BYTES:
            raise LimitReached(
                f"a rendezvous value is {len(value)} bytes; at most {MAX_VALUE_BYTES}"
            )
        with self.changed:
            self._put(key, value)

    def wait(
        self, keys: list[str], timeout: float, is_active: Callable[[], bool]
    ) -> list[bytes] | None:
        """The values of ``keys`` once all are set; None after ``timeout`` (at most
        ``MAX_WAIT_S``) or when the caller went away."""
        if len(keys) > MAX_WAIT_KEYS:
            raise InvalidRequest(f"wait for at most {MAX_WAIT_KEYS} keys at once")
        for k in keys:
            self._check_key(k)
        timeout = timeout if timeout == timeout else 0.0  # NaN
        deadline = time.monotonic() + max(0.0, min(timeout, MAX_WAIT_S))
        with self.changed:
            while not all(k in self.kv for k in keys):
                left = deadline - time.monotonic()
                if left <= 0 or not is_active():
                    return None
                self.changed.wait(min(left, 1.0))
            return [self.kv[k] for k in keys]

    def add(self, key: str, amount: int) -> int:
        """Add ``amount`` to the integer at ``key`` (0 when unset); the new value."""
        self._check_key(key)
        with self.changed:
            old = self.kv.get(key, b"0")
            try:
                value = int(old) + amount
            except ValueError:
                raise NotReady(
                    f"rendezvous key {clip(key)} holds a value that is not an integer; "
                    "StoreAdd counts only integer keys"
                ) from None
            if not -(2**63) <= value < 2**63:
                raise OutOfRange("the counter would overflow int64")
            self._put(key, str(value).encode())
        return value

    def prune(self, name: str, keep_epoch: int = -1) -> None:
        """Drop the keys of ``name``'s other epochs: a re-formed or unloaded model's old keys
        are never read again."""
        keep = f"{name}/{keep_epoch}/"
        with self.changed:
            for k in [k for k in self.kv if k.startswith(f"{name}/") and not k.startswith(keep)]:
                self.nbytes -= len(self.kv.pop(k))
