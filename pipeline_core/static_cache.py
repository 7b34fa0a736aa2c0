"""A stage's preallocated, bucketed KV-cache layer for the compiled decode step (issue 23).

A compiled graph is specialised to its input shapes, so a cache that grows by a token a step
(:mod:`.kv_cache`) would compile once per length.  :class:`BucketLayer` keeps each owned
layer's keys and values in one zeroed buffer ``[row bucket, heads, length bucket, head_dim]``
(rows rounded up to ``row_buckets``, length to ``min_len * 2**k``); the compiled step writes
the new token at its position in place and attends over the whole buffer with the padded part
masked out, so a group recompiles only when it crosses a bucket.

As with ``GrowingLayer``, ``keys``/``values`` are views of the used part ``[rows, heads, used,
head_dim]``, so everything else (lengths, masks, row selection, merging, byte counts, an eager
step) sees a plain ``DynamicLayer``; something that replaces them hands the layer a new tensor,
and the next step copies it into a fresh buffer of the right buckets.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["bucket_layer_class", "len_bucket", "row_bucket"]


def row_bucket(rows: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding ``rows`` (None: more rows than the largest)."""
    return next((b for b in sorted(buckets) if b >= rows), None)


def len_bucket(need: int, min_len: int) -> int:
    """``min_len * 2**k``, the smallest that holds ``need`` tokens."""
    n = min_len
    while n < need:
        n *= 2
    return n


@functools.cache
def bucket_layer_class() -> type:
    """``BucketLayer``, made on first use (pipeline_core imports transformers lazily)."""
    from transformers.cache_utils import DynamicLayer

    class BucketLayer(DynamicLayer):
        """A ``DynamicLayer`` over a bucketed buffer (see module docstring)."""

        _kbuf: torch.Tensor | None = None
        _vbuf: torch.Tensor | None = None

        def __init__(self, row_buckets: Sequence[int], min_len: int) -> None:
            super().__init__()
            self.row_buckets, self.min_len = tuple(row_buckets), min_len

        @classmethod
        def from_layer(cls, layer: Any, row_buckets: Sequence[int], min_len: int) -> Any:
            """A bucket layer holding ``layer``'s keys and values (copied at the next step)."""
            new = cls(row_buckets, min_len)
            new.is_initialized = layer.is_initialized
            for k in ("dtype", "device"):
                if hasattr(layer, k):
                    setattr(new, k, getattr(layer, k))
            new.keys, new.values = layer.keys, layer.values
            return new

        @property
        def used(self) -> int:
            keys = self.keys
            return int(keys.shape[-2]) if keys is not None and keys.dim() == 4 else 0

        def buffers(
            self, k_like: torch.Tensor, v_like: torch.Tensor, need: int
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """Buffers holding the used part with room for ``need`` tokens of rows, heads and
            head size like ``k_like``/``v_like``: this layer's own, or new ones of the buckets
            they fit."""
            keys, values, used = self.keys, self.values, self.used
            rows = k_like.shape[0]
            kbuf, vbuf = self._kbuf, self._vbuf
            if (
                kbuf is not None
                and vbuf is not None
                and used > 0
                and keys.data_ptr() == kbuf.data_ptr()
                and values.data_ptr() == vbuf.data_ptr()
                and keys.stride() == kbuf.stride()
                and values.stride() == vbuf.stride()
                and keys.shape[0] == rows
                and need <= kbuf.shape[-2]
            ):
                return kbuf, vbuf
            rb = row_bucket(rows, self.row_buckets) or rows
            lb = len_bucket(need, self.min_len)
            kbuf = k_like.new_zeros((rb, *k_like.shape[1:-2], lb, k_like.shape[-1]))
            vbuf = v_like.new_zeros((rb, *v_like.shape[1:-2], lb, v_like.shape[-1]))
            if used:
                kbuf[: keys.shape[0], ..., :used, :] = keys
                vbuf[: values.shape[0], ..., :used, :] = values
            self._kbuf, self._vbuf = kbuf, vbuf
            return kbuf, vbuf

        def advance(self, rows: int, need: int) -> None:
            """The buffers now hold ``need`` tokens of ``rows`` rows (written in place)."""
            assert self._kbuf is not None and self._vbuf is not None
            self.keys = self._kbuf[:rows, ..., :need, :]
            self.values = self._vbuf[:rows, ..., :need, :]

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """The eager path (prefill, or a step not compiled): write in place."""
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            used = self.used
            need = used + key_states.shape[-2]
            kbuf, vbuf = self.buffers(key_states, value_states, need)
            rows = key_states.shape[0]
            kbuf[:rows, ..., used:need, :] = key_states
            vbuf[:rows, ..., used:need, :] = value_states
            self.advance(rows, need)
            return self.keys, self.values

        def reset(self) -> None:
            self._kbuf = self._vbuf = None
            super().reset()

    return BucketLayer
