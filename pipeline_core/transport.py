"""Point-to-point transport of activation values over ``torch.distributed``.

A message is a list of values (tensors, ints, floats, bools, None, and tuples of those).  It
goes as an int64 header describing every value (kind, dtype, shape) -- in one first frame of at
most ``FRAME`` ints whose first int is the header length and second the bytes of payload inlined
in the frame, plus a second message only when the header is longer -- then the payloads:
tensors of at most ``PACK_LIMIT`` bytes travel together in one packed buffer (8-byte aligned),
inside the first frame itself when they fit after the header (a decode step's activations,
up to a 7B model's fp32 hidden state: the whole message is one gloo message), larger ones one
message each.  Fewer messages matter: a small gloo message costs about as much as hundreds of
KiB of bandwidth, and gloo sends a message only once its receive is posted, which for a second
message of the same step is after the receiver woke up and read the header: a round trip more
(issue 23 measured the two-message decode hop at several times a one-message one).  Over gloo
the first frame is sent only as long as it is used (a receive may be larger than what
arrives): a full frame's bytes cost ~0.1 ms a hop on a receiver that had been idle (issue 23);
NCCL needs both ends' sizes equal, so device channels send it whole.

Because every message carries its own header, shapes may change from one request to the next,
and a receiver never guesses.  Payloads travel as raw bytes (``uint8`` views), so any dtype
works on any backend (gloo has no bool or bfloat16 send), with no conversion cost.

gloo serves CPU stages; NCCL serves CUDA stages (tensors stay on the GPU).  The process
groups a channel runs on are made here too (:func:`gloo_group`, :func:`nccl_group`;
:func:`nccl_between` decides which, the same way on every rank), for the forward mesh
(:mod:`.runtime`) and the generation ring (:mod:`.ring`) alike.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import math
import operator
import struct
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .errors import TransportError

log = logging.getLogger(__name__)

__all__ = [
    "Channel",
    "Posted",
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
FRAME = 8192
"""Ints in the first frame at most (64 KiB): header and small payloads (a decode step's) in
one message."""
PACK_LIMIT = 256 * 1024
"""Tensors up to this many bytes share one packed payload message."""
_Q, _D = struct.Struct("<q"), struct.Struct("<d")


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
    for v in values:
        _put(v, header, tensors)
    return header, tensors


def _put(v: Any, header: list[int], tensors: list[torch.Tensor]) -> None:
    # the commonest types by identity first: an isinstance chain costs more than the rest of
    # a small message's header (issue 23)
    t = type(v)
    if t is int:
        header += (_INT, v)
    elif t is tuple or t is list or isinstance(v, tuple | list):
        header += (_TUPLE, len(v))
        for item in v:
            _put(item, header, tensors)
    elif isinstance(v, torch.Tensor):
        code = _CODE.get(v.dtype)
        if code is None:
            raise TransportError(f"cannot send dtype {v.dtype}")
        shape = v.shape
        header += (_TENSOR, code, len(shape), *shape)
        if v.numel():
            tensors.append(v)
    elif v is None:
        header.append(_NONE)
    elif isinstance(v, bool):
        header += (_BOOL, int(v))
    elif isinstance(v, int):
        header += (_INT, int(v))
    elif isinstance(v, float):
        header += (_FLOAT, _Q.unpack(_D.pack(v))[0])
    elif isinstance(v, StageFailure):
        header.append(_FAIL)
        _put(torch.tensor(list(v.message.encode()), dtype=torch.uint8), header, tensors)
    else:
        raise TransportError(f"cannot send a value of type {type(v).__name__}")


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
            return _D.unpack(_Q.pack(take()))[0]
        if kind == _NONE:
            return None
        if kind == _TUPLE:
            return tuple(get() for _ in range(take()))
        if kind == _FAIL:
            return _Fail(get())
        raise TransportError(f"corrupt message header (kind {kind})")

    try:
        values = [get() for _ in range(take())]
    except (IndexError, ValueError) as e:  # a count past the end, a negative dimension
        raise TransportError(f"corrupt message header ({e})") from e
    if pos != len(header):
        raise TransportError("corrupt message header (trailing data)")
    return values, specs


Build = Callable[[list[torch.Tensor]], Any]


def _builder(v: Any) -> Build | None:
    """A function of the received tensors giving the value placeholder ``v`` stands for, or
    None when ``v`` holds no tensor (it is immutable: every message may share it)."""
    if isinstance(v, _Slot):
        return operator.itemgetter(v.i)
    if isinstance(v, _Fail):
        inner = _builder(v.inner)
        assert inner is not None
        return lambda ts: StageFailure(bytes(inner(ts).tolist()).decode(errors="replace"))
    if isinstance(v, tuple):
        parts = [_builder(x) for x in v]
        if all(p is None for p in parts):
            return None
        fns = [p if p is not None else _const(x) for p, x in zip(parts, v, strict=True)]
        return lambda ts: tuple([f(ts) for f in fns])
    return None


def _const(v: Any) -> Build:
    return lambda _ts: v


class _Layout:
    """What one header means, worked out once: the header of a decode step's message is the
    same every step (group, dtypes, shapes; never tensor values), so a receiver decodes it
    once per shape, not once per message (issue 23)."""

    __slots__ = ("build", "packed", "tensors")

    def __init__(self, header: Sequence[int]) -> None:
        values, specs = decode_header(list(header))
        self.tensors: list[tuple[torch.dtype, tuple[int, ...], int, int]] = []
        """(dtype, shape, bytes, offset in the packed payload or -1: its own message)."""
        self.packed = 0
        for dtype, shape in specs:
            n = math.prod(shape) * dtype.itemsize
            small = 0 < n <= PACK_LIMIT
            self.tensors.append((dtype, tuple(shape), n, self.packed if small else -1))
            self.packed += _pad8(n) if small else 0
        parts = [_builder(v) for v in values]
        fns = [p if p is not None else _const(v) for p, v in zip(parts, values, strict=True)]
        self.build: Build = lambda ts: [f(ts) for f in fns]


_LAYOUTS_KEPT = 256
"""Distinct headers a receiver remembers (prefills vary; decode steps repeat)."""


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _host_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` as dense host memory whose bytes are its values."""
    if not t.is_cpu:
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t


def _first_frame(header: list[int], packed_n: int, whole: bool) -> tuple[bytearray, int, bool]:
    """The first frame's bytes with the header (its first ``FRAME - 2`` ints) written in;
    where an inlined payload starts; whether the ``packed_n`` bytes of small payloads are
    inlined (they fit after a whole header).  ``whole``: ``FRAME`` ints long (NCCL), else only
    as long as it is used.

    [Note: frames built in host bytes] the frame is written as bytes and wrapped once:
    indexing a tensor from Python costs ~7 us a write (30 for a slice), which made a decode
    step's send ~0.2 ms of CPU (issue 23); on the host the payloads are copied in by address
    too (each torch view or slice costs microseconds)."""
    head = header[: FRAME - 2]
    start = 8 * (2 + len(head))
    inline = len(header) == len(head) and 0 < packed_n <= 8 * FRAME - start
    raw = bytearray(8 * FRAME if whole else start + packed_n * inline)
    struct.pack_into(f"<{2 + len(head)}q", raw, 0, len(header), packed_n * inline, *head)
    return raw, start, inline


def _pack(tensors: Sequence[torch.Tensor], sizes: Sequence[int], addr: int) -> None:
    """Copy each tensor's bytes to host address ``addr`` on, 8-byte aligned."""
    for t, n in zip(tensors, sizes, strict=True):
        if 0 < n <= PACK_LIMIT:
            ctypes.memmove(addr, t.data_ptr(), n)
            addr += _pad8(n)


class Posted:
    """A first frame's receive posted by :meth:`Channel.post`."""

    __slots__ = ("spare", "src", "work")

    def __init__(self, src: int, spare: tuple[torch.Tensor, Any, int], work: Any) -> None:
        self.src, self.spare, self.work = src, spare, work


class Channel:
    """Send and receive value lists to/from ranks of one process group."""

    def __init__(self, pg: dist.ProcessGroup, device: torch.device | str = "cpu") -> None:
        self.pg = pg
        self.device = torch.device(device)
        self._host = self.device.type == "cpu"
        self._pending: list[tuple[Any, Any]] = []
        self._layouts: dict[tuple[int, ...], _Layout] = {}
        self._spare: tuple[torch.Tensor, Any, int] | None = None
        """A host receive frame no result refers to: (frame, the numpy array on its memory,
        its address) -- a receive allocates and wraps no frame (issue 23)."""
        self.bytes_sent = 0

    def send(self, values: Sequence[Any], dst: int) -> None:
        """Queue ``values`` for rank ``dst`` (non-blocking; see :meth:`flush`)."""
        header, tensors = encode_header(values)
        parts = self._host_parts(header, tensors) if self._host else self._parts(header, tensors)
        for t in parts:
            self._pending.append((self.pg.send([t], dst, 0), t))
            self.bytes_sent += t.nbytes
        if len(self._pending) > 256:
            self.flush()

    def _host_parts(self, header: list[int], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The gloo messages of one message (see [Note: frames built in host bytes])."""
        srcs = [_host_ready(t) for t in tensors]
        sizes = [t.nbytes for t in srcs]
        packed_n = sum(_pad8(n) for n in sizes if n <= PACK_LIMIT)
        raw, start, inline = _first_frame(header, packed_n, whole=False)
        parts = [torch.frombuffer(raw, dtype=torch.int64)]
        if len(header) > FRAME - 2:
            parts.append(torch.tensor(header[FRAME - 2 :], dtype=torch.int64))
        if inline:
            _pack(srcs, sizes, parts[0].data_ptr() + start)
        elif packed_n:
            parts.append(torch.zeros(packed_n, dtype=torch.uint8))
            _pack(srcs, sizes, parts[-1].data_ptr())
        return parts + [_as_bytes(t) for t in srcs if t.nbytes > PACK_LIMIT]

    def _parts(self, header: list[int], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The messages of one message on a device channel (NCCL: tensors stay there)."""
        payloads = [_as_bytes(x.to(self.device)) for x in tensors]
        small = [b for b in payloads if b.numel() <= PACK_LIMIT]
        raw, start, inline = _first_frame(header, sum(_pad8(b.numel()) for b in small), whole=True)
        frame = torch.frombuffer(raw, dtype=torch.int64).to(self.device)
        parts = [frame]
        if len(header) > FRAME - 2:
            rest = header[FRAME - 2 :]
            parts.append(torch.tensor(rest, dtype=torch.int64, device=self.device))
        if inline:
            fb = frame.view(torch.uint8)
            for b in small:
                fb[start : start + b.numel()] = b
                start += _pad8(b.numel())
        elif small:
            padded = []
            for b in small:
                padded.append(b)
                if b.numel() % 8:
                    padded.append(b.new_zeros(-b.numel() % 8))
            parts.append(torch.cat(padded))
        return parts + [b for b in payloads if b.numel() > PACK_LIMIT]

    def flush(self) -> None:
        """Wait until every queued send has completed."""
        for work, _t in self._pending:
            work.wait()
        self._pending.clear()

    def _layout(self, header: tuple[int, ...]) -> _Layout:
        layout = self._layouts.get(header)
        if layout is None:
            if len(self._layouts) >= _LAYOUTS_KEPT:
                self._layouts.clear()
            layout = self._layouts[header] = _Layout(header)
        return layout

    def recv(self, src: int) -> list[Any]:
        """Receive one message from rank ``src`` (blocking)."""
        return self.take(self.post(src))

    def post(self, src: int) -> Posted:
        """Post the receive of the next message's first frame from rank ``src`` (a sender's
        send of it can complete from now on); :meth:`take` waits for the message."""
        spare, self._spare = self._spare, None  # taken: a concurrent recv makes its own
        if spare is None:
            frame = torch.empty(FRAME, dtype=torch.int64, device=self.device)
            spare = (frame, frame.numpy() if self._host else None, frame.data_ptr())
        return Posted(src, spare, self.pg.recv([spare[0]], src, 0))

    def take(self, posted: Posted) -> list[Any]:
        """The message whose receive :meth:`post` posted (blocking until it is all here)."""
        src, spare = posted.src, posted.spare
        frame, words, address = spare
        posted.work.wait()
        if words is None:  # a device's frame: its ints copied back to the host
            words = frame.cpu().numpy()
        length, inline = int(words[0]), int(words[1])
        head_n = min(length, FRAME - 2)
        header = struct.unpack_from(f"<{head_n}q", words, 16)
        if length > FRAME - 2:
            rest = torch.empty(length - (FRAME - 2), dtype=torch.int64, device=self.device)
            self.pg.recv([rest], src, 0).wait()
            header += tuple(rest.tolist())
        layout = self._layout(header)
        if inline and inline != layout.packed:
            raise TransportError("corrupt message header (inlined payload size)")
        start = 8 * (2 + head_n)
        if not inline:
            packed = torch.empty(layout.packed, dtype=torch.uint8, device=self.device)
            if layout.packed:
                self.pg.recv([packed], src, 0).wait()
        if self._host:  # copied out by address (see [Note: frames built ...])
            base = address + start if inline else packed.data_ptr()
            tensors = []
            for dtype, shape, n, offset in layout.tensors:
                t = torch.empty(shape, dtype=dtype)
                if offset >= 0:
                    ctypes.memmove(t.data_ptr(), base + offset, n)
                elif n:
                    self.pg.recv([t.view(-1).view(torch.uint8)], src, 0).wait()
                tensors.append(t)
            self._spare = spare  # every tensor was copied out: the next receive may reuse it
            return layout.build(tensors)
        if inline:
            packed = frame.view(torch.uint8)[start : start + layout.packed]
        tensors = []
        for dtype, shape, n, offset in layout.tensors:
            if offset >= 0:
                buf = packed[offset : offset + n]
            else:
                buf = torch.empty(n, dtype=torch.uint8, device=self.device)
                if n:
                    self.pg.recv([buf], src, 0).wait()
            tensors.append(buf.view(dtype).reshape(shape))
        return layout.build(tensors)


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
