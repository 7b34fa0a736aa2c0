"""Point-to-point transport of activation values over ``torch.distributed``.

A message is a list of values (tensors, ints, floats, bools, None, and tuples of those).  It
goes as an int64 header describing every value (kind, dtype, shape) -- in one fixed-size frame
of ``FRAME`` ints whose first int is the header length and second the bytes of payload inlined
in the frame, plus a second frame only when the header is longer -- then the payloads: tensors
of at most ``PACK_LIMIT`` bytes travel together in one packed buffer (8-byte aligned), inside
the frame itself when they fit after the header (a decode step's activations: the whole message
is one gloo message), larger ones one message each.  Fewer messages matter: a small gloo
message costs about as much as hundreds of KiB of bandwidth, and gloo sends a message only
once its receive is posted, which for a second message of the same step is after the receiver
woke up and read the header: a round trip more (issue 23 measured the two-message decode hop at
several times a one-message one).

Because every message carries its own header, shapes may change from one request to the next,
and a receiver never guesses.  Payloads travel as raw bytes (``uint8`` views), so any dtype
works on any backend (gloo has no bool or bfloat16 send), with no conversion cost.

gloo serves CPU stages; NCCL serves CUDA stages (tensors stay on the GPU).  The process
groups a channel runs on are made here too (:func:`gloo_group`, :func:`nccl_group`;
:func:`nccl_between` decides which, the same way on every rank), for the forward mesh
(:mod:`.runtime`) and the generation ring (:mod:`.ring`) alike.
"""

from __future__ import annotations

import datetime
import logging
import math
import struct
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .errors import TransportError

log = logging.getLogger(__name__)

__all__ = [
    "Channel",
    "StageFailure",
    "decode_header",
    "device_identity",
    "encode_header",
    "gloo_group",
    "nccl_between",
    "nccl_group",
    "nccl_usable",
    "use_device",
]


class StageFailure:
    """Sent instead of a stage's outputs when its forward raised: consumers pass it on and the
    driver raises it, so one bad request fails alone and the pipeline stays usable."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"StageFailure({self.message!r})"


class _Fail:
    def __init__(self, inner: Any) -> None:
        self.inner = inner


_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
]
_CODE = {d: i for i, d in enumerate(_DTYPES)}
_TENSOR, _INT, _NONE, _BOOL, _FLOAT, _TUPLE, _FAIL = range(7)
FRAME = 2048
"""Ints in the first frame (16 KiB): header and small payloads (a decode step's) in one message."""
PACK_LIMIT = 256 * 1024
"""Tensors up to this many bytes share one packed payload message."""


def _pad8(n: int) -> int:
    return n + (-n % 8)


class _Slot:
    """Placeholder for the i-th tensor of a message while its header is decoded."""

    def __init__(self, i: int) -> None:
        self.i = i


def encode_header(values: Sequence[Any]) -> tuple[list[int], list[torch.Tensor]]:
    """Header ints and the tensors to send after it, in order."""
    header: list[int] = [len(values)]
    tensors: list[torch.Tensor] = []

    def put(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            if v.dtype not in _CODE:
                raise TransportError(f"cannot send dtype {v.dtype}")
            header.extend([_TENSOR, _CODE[v.dtype], v.dim(), *v.shape])
            if v.numel():
                tensors.append(v)
        elif isinstance(v, bool):
            header.extend([_BOOL, int(v)])
        elif isinstance(v, int):
            header.extend([_INT, v])
        elif isinstance(v, float):
            header.extend([_FLOAT, struct.unpack("<q", struct.pack("<d", v))[0]])
        elif v is None:
            header.append(_NONE)
        elif isinstance(v, StageFailure):
            header.append(_FAIL)
            put(torch.tensor(list(v.message.encode()), dtype=torch.uint8))
        elif isinstance(v, tuple | list):
            header.extend([_TUPLE, len(v)])
            for item in v:
                put(item)
        else:
            raise TransportError(f"cannot send a value of type {type(v).__name__}")

    for v in values:
        put(v)
    return header, tensors


def decode_header(header: list[int]) -> tuple[list[Any], list[tuple[torch.dtype, list[int]]]]:
    """Values with tensor placeholders, and the (dtype, shape) of each tensor to receive."""
    pos = 0
    specs: list[tuple[torch.dtype, list[int]]] = []

    def take() -> int:
        nonlocal pos
        pos += 1
        return header[pos - 1]

    def get() -> Any:
        kind = take()
        if kind == _TENSOR:
            dtype = _DTYPES[take()]
            shape = [take() for _ in range(take())]
            specs.append((dtype, shape))
            return _Slot(len(specs) - 1)
        if kind == _INT:
            return take()
        if kind == _BOOL:
            return bool(take())
        if kind == _FLOAT:
            return struct.unpack("<d", struct.pack("<q", take()))[0]
        if kind == _NONE:
            return None
        if kind == _TUPLE:
            return tuple(get() for _ in range(take()))
        if kind == _FAIL:
            return _Fail(get())
        raise TransportError(f"corrupt message header (kind {kind})")

    values = [get() for _ in range(take())]
    if pos != len(header):
        raise TransportError("corrupt message header (trailing data)")
    return values, specs


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


class Channel:
    """Send and receive value lists to/from ranks of one process group."""

    def __init__(self, pg: dist.ProcessGroup, device: torch.device | str = "cpu") -> None:
        self.pg = pg
        self.device = torch.device(device)
        self._pending: list[tuple[Any, Any]] = []
        self.bytes_sent = 0

    def send(self, values: Sequence[Any], dst: int) -> None:
        """Queue ``values`` for rank ``dst`` (non-blocking; see :meth:`flush`)."""
        header, tensors = encode_header(values)
        payloads = [_as_bytes(x.to(self.device)) for x in tensors]
        small = [b for b in payloads if b.numel() <= PACK_LIMIT]
        head = header[: FRAME - 2]
        start = 8 * (2 + len(head))  # inlined payload: right after the header
        packed_n = sum(_pad8(b.numel()) for b in small)
        inline = len(header) == len(head) and 0 < packed_n <= 8 * FRAME - start
        # [Note: frames built in host bytes] the frame is written as bytes and wrapped once:
        # indexing a tensor from Python costs ~7 us a write (30 for a slice), which made a
        # decode step's send ~0.2 ms of CPU (issue 23)
        raw = bytearray(8 * FRAME)
        struct.pack_into(f"<{2 + len(head)}q", raw, 0, len(header), packed_n * inline, *head)
        host = self.device.type == "cpu"
        if inline and host:
            for b in small:
                raw[start : start + b.numel()] = memoryview(b.numpy())
                start += _pad8(b.numel())
        frame = torch.frombuffer(raw, dtype=torch.int64).to(self.device)
        parts = [frame]
        if len(header) > FRAME - 2:
            rest = header[FRAME - 2 :]
            parts.append(torch.tensor(rest, dtype=torch.int64, device=self.device))
        if inline and not host:
            fb = frame.view(torch.uint8)
            for b in small:
                fb[start : start + b.numel()] = b
                start += _pad8(b.numel())
        elif small and not inline:
            padded = []
            for b in small:
                padded.append(b)
                if b.numel() % 8:
                    padded.append(b.new_zeros(-b.numel() % 8))
            parts.append(torch.cat(padded))
        parts += [b for b in payloads if b.numel() > PACK_LIMIT]
        for t in parts:
            self._pending.append((self.pg.send([t], dst, 0), t))
            self.bytes_sent += t.numel() * t.element_size()
        if len(self._pending) > 256:
            self.flush()

    def flush(self) -> None:
        """Wait until every queued send has completed."""
        for work, _t in self._pending:
            work.wait()
        self._pending.clear()

    def recv(self, src: int) -> list[Any]:
        """Receive one message from rank ``src`` (blocking)."""
        frame = torch.empty(FRAME, dtype=torch.int64, device=self.device)
        self.pg.recv([frame], src, 0).wait()
        words = frame.cpu().numpy()  # the same memory on CPU (see [Note: frames built ...])
        length, inline = int(words[0]), int(words[1])
        head_n = min(length, FRAME - 2)
        header = words[2 : 2 + head_n].tolist()
        if length > FRAME - 2:
            rest = torch.empty(length - (FRAME - 2), dtype=torch.int64, device=self.device)
            self.pg.recv([rest], src, 0).wait()
            header += rest.tolist()
        values, specs = decode_header(header)
        sizes = [math.prod(shape) * dtype.itemsize for dtype, shape in specs]
        packed_total = sum(_pad8(n) for n in sizes if 0 < n <= PACK_LIMIT)
        if inline:
            if inline != packed_total:
                raise TransportError("corrupt message header (inlined payload size)")
            start = 8 * (2 + head_n)
            packed = frame.view(torch.uint8)[start : start + packed_total]
        else:
            packed = torch.empty(packed_total, dtype=torch.uint8, device=self.device)
            if packed_total:
                self.pg.recv([packed], src, 0).wait()
        tensors, offset = [], 0
        for (dtype, shape), n in zip(specs, sizes, strict=True):
            if 0 < n <= PACK_LIMIT:
                buf = packed[offset : offset + n]
                offset += _pad8(n)
            else:
                buf = torch.empty(n, dtype=torch.uint8, device=self.device)
                if n:
                    self.pg.recv([buf], src, 0).wait()
            tensors.append(buf.view(dtype).reshape(shape))

        def fill(v: Any) -> Any:
            if isinstance(v, _Slot):
                return tensors[v.i]
            if isinstance(v, tuple):
                return tuple(fill(x) for x in v)
            if isinstance(v, _Fail):
                return StageFailure(bytes(fill(v.inner).tolist()).decode(errors="replace"))
            return v

        return [fill(v) for v in values]


# ---------------------------------------------------------------------------- process groups


def gloo_group(store: dist.Store, rank: int, size: int, timeout_s: float) -> dist.ProcessGroup:
    return dist.ProcessGroupGloo(store, rank, size, datetime.timedelta(seconds=timeout_s))


def use_device(device: torch.device | str) -> None:
    """Make ``device`` this process's current CUDA device (``"cuda"`` alone: keep the current
    one); no-op for CPU."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is not None:
        torch.cuda.set_device(d)


def device_identity(device: torch.device | str) -> str:
    """``"cpu"``, or ``"cuda:<uuid>"`` naming the physical GPU (the same on every process that
    sees it, whatever its ``CUDA_VISIBLE_DEVICES`` index)."""
    d = torch.device(device)
    if d.type != "cuda":
        return d.type
    index = d.index if d.index is not None else torch.cuda.current_device()
    return f"cuda:{torch.cuda.get_device_properties(index).uuid}"


def nccl_usable(identities: list[str]) -> bool:
    """NCCL joins CUDA ranks on distinct GPUs only."""
    return all(i.startswith("cuda:") for i in identities) and len(set(identities)) == len(
        identities
    )


def nccl_between(store: dist.Store, rank: int, size: int, device: torch.device | str) -> bool:
    """Whether ranks ``0..size-1`` of a group about to be made can use NCCL.  Each rank publishes
    its :func:`device_identity` under ``store`` and reads the others', so all decide alike."""
    store.set(f"device/{rank}", device_identity(device))
    identities = [store.get(f"device/{r}").decode() for r in range(size)]
    use = nccl_usable(identities)
    if not use and torch.device(device).type == "cuda":
        log.info("rank %d: devices %s -> gloo through host memory, not NCCL", rank, identities)
    return use


def nccl_group(store: dist.Store, rank: int, size: int, timeout_s: float) -> dist.ProcessGroup:
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    return dist.ProcessGroupNCCL(store, rank, size, opts)
