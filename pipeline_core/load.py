"""Read only one stage's tensors from a checkpoint directory.

Supported layouts (the ones ``save_pretrained`` writes):

* ``model.safetensors.index.json`` + shards, or a single ``model.safetensors``;
* ``pytorch_model.bin.index.json`` + shards, or a single ``pytorch_model.bin``.

safetensors files are opened lazily (``safe_open``: mmap, one tensor at a time); ``.bin`` files
with ``torch.load(weights_only=True, mmap=True)`` -- never unpickling code, and touching only the
pages of the tensors we copy.  Only the files that hold the stage's tensors are opened.  Every
byte handed out is counted in :class:`ReadStats`, which tests use to prove a stage read nothing
but its own tensors.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError

__all__ = ["CheckpointIndex", "ReadStats", "read_tensors"]

log = logging.getLogger(__name__)

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


@dataclass
class CheckpointIndex:
    """Tensor name -> file, for one checkpoint directory."""

    root: Path
    weight_map: dict[str, str]
    format: str

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
        raise CheckpointError(
            f"tensor {name!r} is not in the checkpoint index of {self.root}"
            + (f" (nor its tied aliases {list(aliases)})" if aliases else "")
            + "; the checkpoint does not match the model config, or is incomplete"
        )

    def files_for(self, names: Iterable[str]) -> set[str]:
        return {self.weight_map[n] for n in names}


def _single_file_map(path: Path, fmt: str) -> dict[str, str]:
    if fmt == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception as e:
            raise CheckpointError(f"cannot read {path}: {e} (corrupt or not safetensors?)") from e
    else:
        keys = list(_torch_load(path).keys())
    return dict.fromkeys(keys, path.name)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot read {path}: {type(e).__name__}: {e}. .bin checkpoints are loaded with "
            "weights_only=True (no pickled code) and must be torch.save zip files"
        ) from e


def read_tensors(
    index: CheckpointIndex,
    wanted: dict[str, tuple[str, list[int], torch.dtype]],
    device: torch.device | str = "cpu",
    stats: ReadStats | None = None,
) -> dict[str, torch.Tensor]:
    """Read exactly the ``wanted`` tensors onto ``device``.

    Args:
        wanted: target name -> (name stored in the checkpoint, expected shape, dtype).
            Floating tensors are cast to ``dtype``; other dtypes must match exactly.
        stats: filled with the bytes read per file.

    Raises:
        CheckpointError: missing file, missing tensor, shape or dtype mismatch, corrupt file.
    """
    stats = stats if stats is not None else ReadStats()
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
        for target, tensor in _read_file(path, index.format, targets, wanted):
            stored, shape, dtype = wanted[target]
            if list(tensor.shape) != list(shape):
                raise CheckpointError(
                    f"tensor {stored!r} in {fname} has shape {list(tensor.shape)}, but the model "
                    f"expects {list(shape)} for {target!r}; the checkpoint does not match the "
                    "config"
                )
            stats.bytes_by_file[fname] += tensor.numel() * tensor.element_size()
            stats.tensors.append(stored)
            if tensor.is_floating_point() and dtype.is_floating_point:
                tensor = tensor.to(device=device, dtype=dtype)
            elif tensor.dtype != dtype:
                raise CheckpointError(
                    f"tensor {stored!r} in {fname} is {tensor.dtype}, expected {dtype}"
                )
            else:
                tensor = tensor.to(device=device)
            for alias in same[stored]:  # tied names share one tensor, read once
                out[alias] = tensor
    return out


def _read_file(path, fmt, targets, wanted):  # type: ignore[no-untyped-def]
    if fmt == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for target in targets:
                    yield target, f.get_tensor(wanted[target][0])
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read {path}: {e} (corrupt file?)") from e
    else:
        state = _torch_load(path)
        for target in targets:
            stored = wanted[target][0]
            if stored not in state:
                raise CheckpointError(f"tensor {stored!r} is listed for {path.name} but absent")
            yield target, state[stored]
        del state
