"""How activations cross one ring edge, from where its two ends are (issue 23).

Each end of an edge publishes its *endpoint* -- the physical device (``cpu``, or ``cuda:<GPU
UUID>``, the same in every process that sees that GPU) and its process id -- and both ends
pick the same :class:`EdgeKind` from the pair:

* ``nccl``: two different GPUs -- NCCL, device to device;
* ``cuda_ipc``: one GPU shared by two processes (NCCL refuses two ranks on one GPU): the
  sender passes a CUDA IPC handle of the activation (a few hundred bytes over gloo) and the
  receiver maps the very same device memory -- no GPU -> host -> GPU copy per token;
* ``local``: both ends in one process (the tensor itself is handed over);
* ``gloo``: any edge with a CPU end -- gloo through host memory.

:func:`edge_kind` is pure (tested with made-up endpoints); :class:`IpcChannel` wraps a gloo
:class:`~pipeline_core.transport.Channel` for ``cuda_ipc`` edges.  The IPC path needs a GPU
and has not yet run on one (``bench/gpu_check.sh`` runs ``tests/test_gpu.py``).

[Note: IPC lifetime] ``storage._share_cuda_()`` (what ``torch.multiprocessing`` uses) keeps
the sender's block alive in a ref-counted limbo until every receiver has dropped its mapping,
and records an event the receiver waits on before reading, so the sender may go on computing
and free its tensor at once; :meth:`IpcChannel.send` calls ``torch.cuda.ipc_collect`` now and
then so freed blocks leave the limbo.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .errors import TransportError

__all__ = [
    "EdgeKind",
    "IpcChannel",
    "choose_edge",
    "edge_kind",
    "endpoint",
    "open_shared",
    "ring_edges",
    "share_cuda",
]

MAGIC = b"PSI1"


class EdgeKind(enum.StrEnum):
    NCCL = "nccl"
    CUDA_IPC = "cuda_ipc"
    LOCAL = "local"
    GLOO = "gloo"


def endpoint(identity: str, pid: int | None = None) -> str:
    """``identity`` (:func:`~pipeline_core.runtime.device_identity`) and a process id."""
    return f"{identity}#{os.getpid() if pid is None else pid}"


def edge_kind(a: str, b: str) -> EdgeKind:
    """The transport between two :func:`endpoint` s (the same whichever end asks)."""
    dev_a, _, pid_a = a.rpartition("#")
    dev_b, _, pid_b = b.rpartition("#")
    if not dev_a or not dev_b:
        raise ValueError(f"endpoints look like 'cuda:<uuid>#<pid>' or 'cpu#<pid>': {a!r}, {b!r}")
    if pid_a == pid_b and dev_a == dev_b:
        return EdgeKind.LOCAL
    if not (dev_a.startswith("cuda:") and dev_b.startswith("cuda:")):
        return EdgeKind.GLOO
    return EdgeKind.CUDA_IPC if dev_a == dev_b else EdgeKind.NCCL


def ring_edges(endpoints: Sequence[str]) -> list[EdgeKind]:
    """Edge ``k`` carries stage ``k``'s output to stage ``k + 1`` (the last back to stage 0)."""
    n = len(endpoints)
    if n < 2:
        return []
    return [edge_kind(endpoints[k], endpoints[(k + 1) % n]) for k in range(n)]


def choose_edge(store: dist.Store, rank: int, identity: str, cuda_ipc: bool = True) -> EdgeKind:
    """Publish this end's endpoint under ``store`` (scoped to one edge), read the other's, and
    return the edge's kind; both ends decide alike.  ``cuda_ipc=False`` on either end (the
    edge reads ``PIPESERVE_CUDA_IPC=0``) turns a ``cuda_ipc`` edge into ``gloo`` (through host
    memory, as before CUDA IPC)."""
    store.set(f"endpoint/{rank}", f"{endpoint(identity)}|{int(cuda_ipc)}")
    got = [store.get(f"endpoint/{r}").decode().rsplit("|", 1) for r in (0, 1)]
    kind = edge_kind(got[0][0], got[1][0])
    if kind is EdgeKind.CUDA_IPC and not all(flag == "1" for _, flag in got):
        return EdgeKind.GLOO
    return kind


# ---------------------------------------------------------------------------- CUDA IPC

_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]
_HEAD = struct.Struct("<4sBBhqqqqB")
"""magic, ndim, dtype code, device index, tensor offset, storage bytes, storage offset bytes,
ref counter offset, event sync required; then sizes, strides (q each) and three byte strings
(handle, ref counter handle, event handle), each length-prefixed (-1: none)."""


def _put_bytes(out: list[bytes], b: bytes | None) -> None:
    out.append(struct.pack("<i", -1 if b is None else len(b)))
    if b is not None:
        out.append(b)


def pack_descriptor(meta: dict[str, Any]) -> torch.Tensor:
    """The IPC metadata of one tensor as a CPU ``uint8`` tensor (no pickle)."""
    n = len(meta["size"])
    parts = [
        _HEAD.pack(
            MAGIC,
            n,
            _DTYPES.index(meta["dtype"]),
            meta["device"],
            meta["offset"],
            meta["storage_bytes"],
            meta["storage_offset_bytes"],
            meta["ref_counter_offset"],
            int(meta["event_sync_required"]),
        ),
        struct.pack(f"<{2 * n}q", *meta["size"], *meta["stride"]),
    ]
    for key in ("handle", "ref_counter_handle", "event_handle"):
        _put_bytes(parts, meta[key])
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


def unpack_descriptor(desc: torch.Tensor) -> dict[str, Any]:
    raw = bytes(desc.numpy().tobytes())
    magic, n, code, dev, off, sbytes, soff, rcoff, sync = _HEAD.unpack_from(raw)
    if magic != MAGIC:
        raise TransportError("not a CUDA IPC descriptor")
    pos = _HEAD.size
    dims = struct.unpack_from(f"<{2 * n}q", raw, pos)
    pos += 16 * n
    meta: dict[str, Any] = {
        "size": list(dims[:n]),
        "stride": list(dims[n:]),
        "dtype": _DTYPES[code],
        "device": dev,
        "offset": off,
        "storage_bytes": sbytes,
        "storage_offset_bytes": soff,
        "ref_counter_offset": rcoff,
        "event_sync_required": bool(sync),
    }
    for key in ("handle", "ref_counter_handle", "event_handle"):
        (length,) = struct.unpack_from("<i", raw, pos)
        pos += 4
        meta[key] = None if length < 0 else raw[pos : pos + length]
        pos += max(0, length)
    return meta


def share_cuda(t: torch.Tensor) -> torch.Tensor:
    """A descriptor through which another process on this GPU maps ``t`` (see module Note)."""
    if t.dtype not in _DTYPES:
        raise TransportError(f"cannot share a {t.dtype} tensor over CUDA IPC")
    storage = t.untyped_storage()
    dev, handle, sbytes, soff, rc_handle, rc_off, ev_handle, ev_sync = storage._share_cuda_()
    return pack_descriptor(
        {
            "size": list(t.shape),
            "stride": list(t.stride()),
            "dtype": t.dtype,
            "device": int(dev),
            "offset": t.storage_offset(),
            "storage_bytes": sbytes,
            "storage_offset_bytes": soff,
            "handle": handle,
            "ref_counter_handle": rc_handle,
            "ref_counter_offset": rc_off,
            "event_handle": ev_handle,
            "event_sync_required": ev_sync,
        }
    )


def open_shared(desc: torch.Tensor, device: int | None = None) -> torch.Tensor:
    """The tensor a :func:`share_cuda` descriptor names, mapped from the sender's memory;
    ``device``: this process's index of that GPU (the sender's may differ)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    m = unpack_descriptor(desc)
    if device is not None:
        m["device"] = device
    return rebuild_cuda_tensor(
        torch.Tensor,
        torch.Size(m["size"]),
        tuple(m["stride"]),
        m["offset"],
        torch.storage.TypedStorage,
        m["dtype"],
        m["device"],
        m["handle"],
        m["storage_bytes"],
        m["storage_offset_bytes"],
        False,
        m["ref_counter_handle"],
        m["ref_counter_offset"],
        m["event_handle"],
        m["event_sync_required"],
    )


class IpcChannel:
    """A gloo channel whose CUDA tensors travel as IPC descriptors (``cuda_ipc`` edges).

    A message goes as ``[shared, *values]``: ``shared`` (int64) lists which tensors, in the
    order the message holds them, are descriptors, so no tensor is mistaken for one."""

    def __init__(
        self,
        inner: Any,
        device: torch.device | str | None = None,
        *,
        share: Callable[[torch.Tensor], torch.Tensor] = share_cuda,
        open_: Callable[[torch.Tensor], torch.Tensor] | None = None,
        is_shared: Callable[[torch.Tensor], bool] = lambda t: t.is_cuda,
    ) -> None:
        index = torch.device(device).index if device is not None else None
        self.inner, self._share, self._is_shared = inner, share, is_shared
        self._open = open_ or (lambda d: open_shared(d, index))
        self._sends = 0

    @property
    def bytes_sent(self) -> int:
        return int(self.inner.bytes_sent)

    def send(self, values: Sequence[Any], dst: int) -> None:
        shared: list[int] = []
        count = [0]

        def swap(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                i, count[0] = count[0], count[0] + 1
                if self._is_shared(v):
                    shared.append(i)
                    return self._share(v)
                return v
            if isinstance(v, tuple | list):
                return type(v)(swap(x) for x in v)
            return v

        body = [swap(v) for v in values]
        self.inner.send([torch.tensor(shared, dtype=torch.int64), *body], dst)
        self._sends += 1
        if self._sends % 256 == 0 and torch.cuda.is_available():
            torch.cuda.ipc_collect()

    def flush(self) -> None:
        self.inner.flush()

    def recv(self, src: int) -> list[Any]:
        got = self.inner.recv(src)
        shared = set(got[0].tolist())
        count = [0]

        def swap(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                i, count[0] = count[0], count[0] + 1
                return self._open(v) if i in shared else v
            if isinstance(v, tuple):
                return tuple(swap(x) for x in v)
            return v

        return [swap(v) for v in got[1:]]
