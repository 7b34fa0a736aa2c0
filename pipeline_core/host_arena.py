"""A stage's weights on the host, in one region backed by transparent huge pages.

[Note: huge pages for host weights]
Decode on a CPU reads every weight of a stage once per token, so it is bound by how fast the
core streams them from memory.  In 4 KiB pages every 4 KiB of a weight needs its own TLB entry;
a 28 MB layer is ~7000 of them, far past what the TLB holds, so each token walks the page
tables again, and the hardware prefetchers stop at every page boundary.  In 2 MiB pages the same
layer is 14 entries.  Measured on a 2-core AMD EPYC VM (``bench/results/huge_pages.md``, two
pipelines of one plan interleaved in every round, 3 fresh allocations x 3 rounds): 2 stages of
the 134M Llama, fp32, ran 0.94x the per-token time with their weights in huge pages than in
ordinary pages (paired median), 4 stages 0.96x (an earlier one-allocation run: 0.89x / 0.98x).
HF ``generate`` of the same model on a copy of its weights moved into huge pages ran
0.94x-0.97x its own time in the same runs.

The kernel gives huge pages to anonymous memory only where asked (``madvise`` mode, Debian's and
Ubuntu's default; ``always`` gives them anyway, ``never`` not at all), and only to 2 MiB-aligned
stretches faulted in after the advice.  torch's allocator asks only under
``THP_MEM_ALLOC_ENABLE=1``, and even then a stage process measured here held none (its large
regions eligible, not backed: most likely glibc serving allocations below 32 MiB from heap
pages already faulted in, not confirmed).  So the loader asks itself: one private anonymous mapping
per stage, sized for all its tensors up front (the plan knows every shape), aligned to 2 MiB,
advised ``MADV_HUGEPAGE`` before any byte is touched; each tensor is read straight into its
place (or cast into it, where the checkpoint's dtype is not the plan's), so loading holds no
second copy of a tensor.
Each tensor starts on a 64-byte boundary, so nothing straddles a cache line it need not.

The region lives as long as any tensor in it (``torch.frombuffer`` holds the mapping); a stage
dropped is unmapped whole.  Where ``madvise`` is missing (not Linux) or refused, the region is an
ordinary mapping and nothing else changes.  ``huge_pages=False`` on the loader
(``StageOptions.huge_pages``; the CLI and workers read ``PIPESERVE_HUGE_PAGES=0``) keeps every
tensor in its own allocation, as before.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable

import torch

__all__ = ["ALIGN", "HUGE_PAGE", "HostArena", "arena_bytes"]

HUGE_PAGE = 2 << 20
"""Transparent huge page size on x86-64 (and the usual arm64 kernels)."""
ALIGN = 64
"""Byte alignment of each tensor in the region (one cache line)."""


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def arena_bytes(sizes: Iterable[int]) -> int:
    """Bytes a region needs for tensors of ``sizes`` bytes each, each at an aligned start."""
    return sum(_aligned(n) for n in sizes)


class HostArena:
    """One huge-page region of ``nbytes``: :meth:`take` hands out the next bytes to read a
    tensor into, :meth:`place` copies a CPU tensor in."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._used = 0
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.advised = False
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        if advice is not None:
            try:
                region.madvise(advice)
                self.advised = True
            except OSError:  # a kernel without THP refuses the advice: ordinary pages
                pass
        raw = torch.frombuffer(region, dtype=torch.uint8)  # holds the mapping while it lives
        skip = (-raw.data_ptr()) % HUGE_PAGE
        self._raw = raw[skip : skip + nbytes]

    @property
    def free(self) -> int:
        return self.nbytes - self._used

    def take(self, nbytes: int) -> torch.Tensor | None:
        """The next ``nbytes`` of the region as a uint8 tensor to read into, or None when they
        do not fit in what is left."""
        if nbytes == 0 or _aligned(nbytes) > self.free:
            return None
        start = self._used
        self._used += _aligned(nbytes)
        return self._raw[start : start + nbytes]

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s bytes lie in the region."""
        base = self._raw.data_ptr()
        return tensor.device.type == "cpu" and base <= tensor.data_ptr() < base + self.nbytes

    def place(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``tensor``'s values in the region, as ``dtype`` (default: its own), contiguous; one
        already there in that dtype comes back as it is.  A tensor not on the CPU, or that
        does not fit in what is left, comes back as ``tensor.to(dtype)``."""
        dtype = tensor.dtype if dtype is None else dtype
        if tensor.dtype == dtype and self.holds(tensor):
            return tensor
        slot = None
        if tensor.device.type == "cpu":
            slot = self.take(tensor.numel() * dtype.itemsize)
        if slot is None:
            return tensor.to(dtype=dtype)
        out = slot.view(dtype).view(tensor.shape)
        out.copy_(tensor)  # converts the dtype
        return out

    def release(self) -> None:
        """Drop the arena's own hold on the region: it lives on in the placed tensors only."""
        self._raw = torch.empty(0, dtype=torch.uint8)
