"""Read only one stage's tensors from a checkpoint directory.

Supported layouts (the ones ``save_pretrained`` writes):

* ``model.safetensors.index.json`` + shards, or a single ``model.safetensors``;
* ``pytorch_model.bin.index.json`` + shards, or a single ``pytorch_model.bin``.

Files are read directly: a safetensors JSON header, or a ``.bin`` zip's pickle unpickled on the
meta device (``weights_only=True``: never code), gives each tensor's byte range, and only the
stage's ranges are read (``readinto`` a buffer the stage then owns -- no mmap of the whole
file, no page-cache pages held, no second copy; a truncated or corrupt file is an error here,
not a crash mid-request).  Only the
files that hold the stage's tensors are opened.  Every byte read is counted in
:class:`ReadStats`, which tests use to prove a stage read nothing but its own tensors.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .host_arena import HostArena, arena_bytes

__all__ = ["CheckpointIndex", "Merge", "ReadStats", "read_tensors"]

log = logging.getLogger(__name__)

Buffer = Callable[[str, int, torch.dtype], torch.Tensor]
"""(stored name, bytes, stored dtype) -> the uint8 tensor a reader reads that tensor into."""

_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors", "safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin", "bin"),
)


@dataclass
class ReadStats:
    """Bytes and tensors read, per file."""

    bytes_by_file: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    tensors: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_file.values())


@dataclass(frozen=True)
class Merge:
    """A model tensor the checkpoint stores in pieces (one per expert, say) that are combined
    on load: ``pieces`` maps each source pattern to its checkpoint keys, in order."""

    pieces: dict[str, list[str]]
    combine: Callable[[dict[str, list[torch.Tensor]]], torch.Tensor]


@dataclass
class CheckpointIndex:
    """Tensor name -> file, for one checkpoint directory."""

    root: Path
    weight_map: dict[str, str]
    format: str
    renames: dict[str, str] = field(default_factory=dict)
    """Model tensor name -> checkpoint key where the checkpoint uses other (legacy) names."""
    merges: dict[str, Merge] = field(default_factory=dict)
    """Model tensor name -> its pieces, where the checkpoint stores it in pieces."""

    @classmethod
    def open(cls, root: str | Path) -> CheckpointIndex:
        root = Path(root)
        if not root.is_dir():
            raise CheckpointError(f"checkpoint directory {root} does not exist")
        for index_name, single, fmt in _LAYOUTS:
            index = root / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CheckpointError(
                        f"{index} is not a valid checkpoint index (needs a 'weight_map'): {e}"
                    ) from e
                return cls(root, dict(weight_map), fmt)
            if (root / single).is_file():
                return cls(root, _single_file_map(root / single, fmt), fmt)
        raise CheckpointError(
            f"no checkpoint in {root}: expected one of model.safetensors.index.json, "
            "model.safetensors, pytorch_model.bin.index.json or pytorch_model.bin"
        )

    def resolve(self, name: str, aliases: Iterable[str] = ()) -> str:
        """The name under which ``name`` (or one of its tied aliases) is stored."""
        for candidate in (name, *aliases):
            if candidate in self.weight_map:
                return candidate
            if self.renames.get(candidate) in self.weight_map:
                return self.renames[candidate]
            if candidate in self.merges:
                return candidate  # read_tensors reads and combines its pieces
        raise CheckpointError(
            f"tensor {name!r} is not in the checkpoint index of {self.root}"
            + (f" (nor its tied aliases {list(aliases)})" if aliases else "")
            + "; the checkpoint does not match the model config, or is incomplete"
        )

    def files_for(self, names: Iterable[str]) -> set[str]:
        return {self.weight_map[n] for n in names}

    def stored_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating tensor stored (as ``from_pretrained(dtype="auto")``
        finds it when the config names none), read from one file's header; None: no float."""
        for fname in sorted(set(self.weight_map.values())):
            path = self.root / fname
            if not path.is_file():
                continue
            for dtype in _stored_dtypes(path, self.format):
                if dtype.is_floating_point:
                    return dtype
        return None


def _single_file_map(path: Path, fmt: str) -> dict[str, str]:
    if fmt == "safetensors":
        with open(path, "rb") as f:
            header, _ = _safetensors_header(f, path, path.stat().st_size)
        keys = [k for k in header if k != "__metadata__"]
    else:
        keys = list(_torch_load(path).keys())
    return dict.fromkeys(keys, path.name)


def _stored_dtypes(path: Path, fmt: str) -> Iterator[torch.dtype]:
    if fmt == "safetensors":
        with open(path, "rb") as f:
            header, _ = _safetensors_header(f, path, path.stat().st_size)
        for name, meta in header.items():
            code = meta.get("dtype") if isinstance(meta, dict) else None
            if name != "__metadata__" and code in _ST_DTYPES:
                yield _ST_DTYPES[code]
    else:
        for t in _torch_load(path).values():
            if isinstance(t, torch.Tensor):
                yield t.dtype


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A ``.bin`` file's tensors on the meta device: each storage remembers its byte offset in
    the file (``_checkpoint_offset``); nothing is read but the pickle."""
    try:
        return torch.load(path, map_location="meta", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot read {path}: {type(e).__name__}: {e}. .bin checkpoints are loaded with "
            "weights_only=True (no pickled code) and must be torch.save zip files"
        ) from e


def read_tensors(
    index: CheckpointIndex,
    wanted: dict[str, tuple[str, list[int] | None, torch.dtype | None]],
    device: torch.device | str = "cpu",
    stats: ReadStats | None = None,
    *,
    huge_pages: bool = True,
) -> dict[str, torch.Tensor]:
    """Read exactly the ``wanted`` tensors onto ``device``.

    Args:
        wanted: target name -> (name stored in the checkpoint, expected shape, dtype).
            Floating tensors are cast to ``dtype``; other dtypes must match exactly.  A name
            in ``index.merges`` is read as its pieces, combined.
        stats: filled with the bytes read per file.
        huge_pages: on the CPU, put all the tensors in one region backed by huge pages
            (:mod:`.host_arena`, [Note: huge pages for host weights]); False: each in its own
            allocation.

    Raises:
        CheckpointError: missing file, missing tensor, shape or dtype mismatch, corrupt file.
    """
    stats = stats if stats is not None else ReadStats()
    arena = _arena_for(wanted, device) if huge_pages else None
    out = _read(index, wanted, device, stats, arena)
    if arena is not None:
        arena.release()
    return out


def _arena_for(
    wanted: dict[str, tuple[str, list[int] | None, torch.dtype | None]],
    device: torch.device | str,
) -> HostArena | None:
    """A region for all of ``wanted`` on the CPU, once per stored tensor (tied names share
    one); None off the CPU, or when a shape or dtype is not known up front.  A region smaller
    than a huge page gets none, but costs nothing either: every stage loads the same way."""
    if torch.device(device).type != "cpu":
        return None
    sizes: dict[str, int] = {}
    for stored, shape, dtype in wanted.values():
        if shape is None or dtype is None:
            return None
        numel = 1
        for s in shape:
            numel *= s
        sizes[stored] = numel * dtype.itemsize
    total = arena_bytes(sizes.values())
    return HostArena(total) if total else None


def _read(
    index: CheckpointIndex,
    wanted: dict[str, tuple[str, list[int] | None, torch.dtype | None]],
    device: torch.device | str,
    stats: ReadStats,
    arena: HostArena | None,
) -> dict[str, torch.Tensor]:
    merged = {t: w for t, w in wanted.items() if w[0] in index.merges}
    if merged:
        wanted = {t: w for t, w in wanted.items() if t not in merged}
        out = _read(index, wanted, device, stats, arena)
        for target, (stored, shape, dtype) in merged.items():
            out[target] = _read_merged(index, stored, shape, dtype, device, stats, arena)
        return out
    buffer = _buffers(wanted, arena)
    by_file: dict[str, list[str]] = defaultdict(list)
    same: dict[str, list[str]] = defaultdict(list)  # stored name -> targets (tied names)
    for target, (stored, _shape, _dtype) in wanted.items():
        if stored not in index.weight_map:
            raise CheckpointError(f"tensor {stored!r} is not in the checkpoint index")
        if not same[stored]:
            by_file[index.weight_map[stored]].append(target)
        same[stored].append(target)
    out: dict[str, torch.Tensor] = {}
    for fname, targets in sorted(by_file.items()):
        path = index.root / fname
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint file {path} is listed in the index but missing; re-download or "
                "re-save the checkpoint"
            )
        for target, tensor in _read_file(path, index.format, targets, wanted, buffer):
            stored, shape, dtype = wanted[target]
            if shape is not None and list(tensor.shape) != list(shape):
                raise CheckpointError(
                    f"tensor {stored!r} in {fname} has shape {list(tensor.shape)}, but the model "
                    f"expects {list(shape)} for {target!r}; the checkpoint does not match the "
                    "config"
                )
            stats.bytes_by_file[fname] += tensor.numel() * tensor.element_size()
            stats.tensors.append(stored)
            what = f"tensor {stored!r} in {fname}"
            tensor = _cast(tensor, dtype, device, False, what, arena)
            for alias in same[stored]:  # tied names share one tensor, read once
                out[alias] = tensor
    return out


def _cast(
    tensor: torch.Tensor,
    dtype: torch.dtype | None,
    device: torch.device | str,
    copy: bool,
    what: str,
    arena: HostArena | None = None,
) -> torch.Tensor:
    """``tensor`` on ``device``: a floating tensor cast to a floating ``dtype``, any other
    dtype exactly as expected (None: as stored, for the pieces of a merged tensor); with an
    ``arena`` (the CPU), in it: where it was read into it, as it is; else copied in."""
    if dtype is None or (tensor.is_floating_point() and dtype.is_floating_point):
        if arena is not None:
            return arena.place(tensor, dtype)
        return tensor.to(device=device, dtype=dtype, copy=copy)
    if tensor.dtype != dtype:
        raise CheckpointError(f"{what} is {tensor.dtype}, expected {dtype}")
    return arena.place(tensor) if arena is not None else tensor.to(device=device, copy=copy)


def _read_merged(
    index: CheckpointIndex,
    name: str,
    shape: list[int],
    dtype: torch.dtype,
    device: torch.device | str,
    stats: ReadStats,
    arena: HostArena | None,
) -> torch.Tensor:
    merge = index.merges[name]
    keys = [k for ks in merge.pieces.values() for k in ks]
    missing = [k for k in keys if k not in index.weight_map]
    if missing:
        raise CheckpointError(f"pieces of {name!r} are not in the checkpoint index: {missing}")
    raw = read_tensors(index, {k: (k, None, None) for k in keys}, "cpu", stats, huge_pages=False)
    try:
        tensor = merge.combine({p: [raw.pop(k) for k in ks] for p, ks in merge.pieces.items()})
    except Exception as e:
        raise CheckpointError(f"cannot merge the {len(keys)} pieces of {name!r}: {e}") from e
    if list(tensor.shape) != list(shape):
        raise CheckpointError(
            f"the {len(keys)} pieces of {name!r} merge to shape {list(tensor.shape)}, but the "
            f"model expects {list(shape)}; the checkpoint does not match the config"
        )
    return _cast(tensor, dtype, device, False, f"the tensor merged into {name!r}", arena)


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _safetensors_header(f: Any, path: Path, size: int) -> tuple[dict[str, Any], int]:
    raw = f.read(8)
    n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if n <= 0 or 8 + n > size:
        raise CheckpointError(f"cannot read {path}: not a safetensors file (bad header length)")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"cannot read {path}: corrupt safetensors header")
    return header, 8 + n


def _read_safetensors(path: Path, names: list[str], buffer: Buffer) -> Iterator[torch.Tensor]:
    size = path.stat().st_size
    with open(path, "rb", buffering=0) as f:
        header, start = _safetensors_header(f, path, size)
        for name in names:
            meta = header.get(name)
            if not isinstance(meta, dict):
                raise CheckpointError(f"tensor {name!r} is listed for {path.name} but absent")
            try:
                dtype = _ST_DTYPES[meta["dtype"]]
                shape = [int(s) for s in meta["shape"]]
                begin, end = (int(x) for x in meta["data_offsets"])
            except (KeyError, ValueError, TypeError) as e:
                raise CheckpointError(f"cannot read {path}: bad entry for {name!r}: {e}") from e
            numel = 1
            for s in shape:
                numel *= s
            nbytes = end - begin
            if nbytes != numel * dtype.itemsize or begin < 0 or start + end > size:
                raise CheckpointError(
                    f"cannot read {path}: tensor {name!r} has an inconsistent byte range "
                    "(truncated or corrupt file)"
                )
            buf = _read_range(f, path, start + begin, name, buffer(name, nbytes, dtype))
            yield buf.view(dtype).reshape(shape)


def _read_range(f: Any, path: Path, offset: int, name: str, buf: torch.Tensor) -> torch.Tensor:
    """``buf``'s length in bytes at ``offset`` of an open file, read into ``buf`` (uint8;
    ``readinto``: no mapping, no page of the file counted in this process's memory, no second
    copy)."""
    nbytes = buf.numel()
    view, done = memoryview(buf.numpy()), 0
    f.seek(offset)
    while done < nbytes:
        got = f.readinto(view[done:])
        if not got:
            raise CheckpointError(f"cannot read {path}: file ended inside {name!r}")
        done += got
    return buf


def _read_bin(path: Path, names: list[str], buffer: Buffer) -> Iterator[torch.Tensor]:
    """The named tensors of a ``torch.save`` zip file, each read from its byte range.

    [Note: .bin shards without mmap]
    ``torch.load(mmap=True)`` then copying the stage's tensors out kept the touched pages of
    the mapped shard resident in the process beside the copies: stages of a Bloom-7b1 ``.bin``
    checkpoint peaked at 1.37-1.55x their bytes.  Loading on the meta device unpickles only
    the structure (``weights_only``) and records where each storage starts in the file; each
    wanted tensor is then read from there like a safetensors range.
    """
    state = _torch_load(path)
    size = path.stat().st_size
    with open(path, "rb", buffering=0) as f:
        for name in names:
            t = state.get(name)
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"tensor {name!r} is listed for {path.name} but absent")
            base = getattr(t.untyped_storage(), "_checkpoint_offset", None)
            if base is None:
                raise CheckpointError(
                    f"cannot read {path}: no byte offset for {name!r}; .bin checkpoints must be "
                    "torch.save zip files (re-save it with a current torch)"
                )
            item = t.element_size()
            span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
            span = span if t.numel() else 0
            begin = base + t.storage_offset() * item
            if begin + span * item > size:
                raise CheckpointError(
                    f"cannot read {path}: tensor {name!r} lies past the end of the file "
                    "(truncated or corrupt file)"
                )
            compact = span == t.numel() and t.is_contiguous()
            buf = (buffer if compact else _new)(name, span * item, t.dtype)
            flat = _read_range(f, path, begin, name, buf).view(t.dtype)
            out = flat.as_strided(t.shape, t.stride())
            yield out if compact else out.clone()
        del state


def _new(_stored: str, nbytes: int, _dtype: torch.dtype) -> torch.Tensor:
    """A new buffer of ``nbytes`` (a :data:`Buffer`)."""
    return torch.empty(nbytes, dtype=torch.uint8)


def _buffers(
    wanted: dict[str, tuple[str, list[int] | None, torch.dtype | None]], arena: HostArena | None
) -> Buffer:
    """Where a stored tensor is read: its place in ``arena`` when it stays there as read (the
    plan's dtype is the stored one), else a new buffer."""
    if arena is None:
        return _new
    as_read = {stored: dtype for stored, _shape, dtype in wanted.values()}

    def buffer(stored: str, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        slot = arena.take(nbytes) if as_read.get(stored) == dtype else None
        return slot if slot is not None else _new(stored, nbytes, dtype)

    return buffer


def _read_file(path, fmt, targets, wanted, buffer):  # type: ignore[no-untyped-def]
    stored = [wanted[t][0] for t in targets]
    reader = _read_safetensors if fmt == "safetensors" else _read_bin
    yield from zip(targets, reader(path, stored, buffer), strict=False)
