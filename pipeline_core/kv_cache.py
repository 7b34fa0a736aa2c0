"""KV-cache layers that append in place.

``transformers``' ``DynamicLayer`` grows by ``torch.cat([old, new])`` every token: each decode
step copies the whole cache of every layer (at 32 rows x 100 tokens of a 768-wide model, about
20 MB per layer per step, a fifth of a CPU stage's step time).  :class:`GrowingLayer` keeps
spare room after the used length -- an eighth more, at least ``MIN_SPARE`` tokens, so a cache
holds at most that much beyond the KV budget the planner counts -- and writes new tokens into
it: one full copy per ``spare`` tokens instead of one per token.  ``keys``/``values`` are views
of the used part.  Anything that replaces them (row selection, merging groups) just hands the
layer a new tensor: the next append sees that the view no longer starts its buffer and starts
a new buffer from it.  Cropping keeps the buffer (the view still starts it).

A stage's *phantom* layers (those it does not own: they only track lengths, see gen_stage)
are :class:`PhantomLayer`: always zeros, so an append copies nothing -- the layer's tensors are
views of one zeros buffer, made again (not copied) when the rows change or it is full.  A
phantom used to cost a ``GrowingLayer`` append per step each, which 4 stages of a 12-layer
model paid 36 times per token (issue 23).  :func:`advance_phantoms` moves all of a stage's
phantoms on at once: one view of one zeros buffer shared by all of them, no per-layer
``Cache.update`` (~30 us each; 0.25 ms a step for the 9 phantoms of a 4-stage split).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = ["advance_phantoms", "grow_in_place"]

MIN_SPARE = 16
"""Tokens of room added at least when a buffer grows."""


@functools.cache
def _classes() -> tuple[type, type, type]:
    """``(DynamicLayer, GrowingLayer, PhantomLayer)``, made on first use (pipeline_core does
    not import transformers until a model needs it)."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A ``DynamicLayer`` whose appends write into spare room (see module docstring)."""

        _kbuf: torch.Tensor | None = None
        _vbuf: torch.Tensor | None = None

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            keys, values = self.keys, self.values
            used = keys.shape[-2] if keys.numel() else 0
            need = used + key_states.shape[-2]
            kbuf, vbuf = self._kbuf, self._vbuf
            ours = (
                kbuf is not None
                and vbuf is not None
                and used > 0
                and keys.data_ptr() == kbuf.data_ptr()
                and values.data_ptr() == vbuf.data_ptr()
                and keys.shape[:-2] == kbuf.shape[:-2]
                and keys.stride() == kbuf.stride()
                and values.stride() == vbuf.stride()
                and need <= kbuf.shape[-2]
            )
            if not ours:
                cap = need + max(MIN_SPARE, need // 8)
                kbuf = key_states.new_empty((*key_states.shape[:-2], cap, key_states.shape[-1]))
                vbuf = value_states.new_empty(
                    (*value_states.shape[:-2], cap, value_states.shape[-1])
                )
                if used:
                    kbuf[..., :used, :] = keys
                    vbuf[..., :used, :] = values
                self._kbuf, self._vbuf = kbuf, vbuf
            assert kbuf is not None and vbuf is not None
            kbuf[..., used:need, :] = key_states
            vbuf[..., used:need, :] = value_states
            self.keys, self.values = kbuf[..., :need, :], vbuf[..., :need, :]
            return self.keys, self.values

        def reset(self) -> None:
            self._kbuf = self._vbuf = None
            super().reset()

    class PhantomLayer(DynamicLayer):
        """Zeros that only track the length (a layer another stage owns)."""

        _z: torch.Tensor | None = None

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            keys = self.keys
            used = keys.shape[-2] if keys.dim() == key_states.dim() else 0
            need = used + key_states.shape[-2]
            z = self._z
            if (
                z is None
                or z.shape[:-2] != key_states.shape[:-2]
                or z.shape[-2] < need
                or z.shape[-1] != key_states.shape[-1]
                or z.dtype != key_states.dtype
                or z.device != key_states.device
            ):
                cap = need + max(MIN_SPARE, need // 8)
                z = key_states.new_zeros((*key_states.shape[:-2], cap, key_states.shape[-1]))
                self._z = z
            self.keys = self.values = z[..., :need, :]
            return self.keys, self.values

        def reset(self) -> None:
            self._z = None
            super().reset()

    return DynamicLayer, GrowingLayer, PhantomLayer


def grow_in_place(cache: Any, phantoms: Iterable[int] = ()) -> Any:
    """Swap ``cache``'s empty plain ``DynamicLayer``s (not sliding-window or other kinds) for
    :class:`GrowingLayer`, those at indices ``phantoms`` for :class:`PhantomLayer`; returns
    ``cache``."""
    base, growing, phantom = _classes()
    layers = getattr(cache, "layers", None)
    if layers is None:
        return cache
    ghost = set(phantoms)
    for i, layer in enumerate(layers):
        if type(layer) is base and not layer.is_initialized:
            layers[i] = phantom() if i in ghost else growing()
    return cache


def advance_phantoms(
    cache: Any, phantoms: Sequence[int], rows: int, n: int, device: torch.device
) -> None:
    """Append ``n`` tokens of ``rows`` rows to the layers ``phantoms`` of ``cache``.

    When every phantom is an initialized :class:`PhantomLayer` of ``rows`` rows and one
    length (every step after the first, until rows change), they all become one view of one
    zeros buffer kept on the cache; otherwise (the first step, after a row selection or a
    merge, another layer kind) each layer appends through the cache as usual.  When the
    phantoms are still as the last call left them (the same view object, which nothing else
    assigns), only a new view is made: no tensor attribute is read on the token's path
    (~50 us a step in situ, with the CPU caches cold after the layers' matmuls)."""
    if n <= 0 or not phantoms:
        return
    layers = cache.layers
    state = cache.__dict__.get("_pipeserve_phantom_state")  # (view, buffer, rows, used, cap)
    if state is not None and state[2] == rows and state[3] + n <= state[4]:
        view = state[0]
        if all(layers[i].keys is view and layers[i].values is view for i in phantoms):
            _set_phantoms(cache, layers, phantoms, state[1], rows, state[3] + n, state[4])
            return
    phantom = _classes()[2]
    first = layers[phantoms[0]]
    used = -1
    if type(first) is phantom and first.is_initialized and first.keys.dim() == 4:
        shape = first.keys.shape
        used = shape[-2] if shape[0] == rows else -1
        for i in phantoms:
            layer = layers[i]
            if type(layer) is not phantom or not layer.is_initialized or layer.keys.shape != shape:
                used = -1
                break
    if used < 0:
        cache.__dict__.pop("_pipeserve_phantom_state", None)
        z = torch.zeros(rows, 1, n, 1, device=device)
        for i in phantoms:
            cache.update(z, z, i)
        return
    need = used + n
    buf = cache.__dict__.get("_pipeserve_phantoms")
    if (
        buf is None
        or buf.shape[0] != rows
        or buf.shape[-2] < need
        or buf.dtype != first.keys.dtype
        or buf.device != first.keys.device
    ):
        cap = need + max(MIN_SPARE, need // 8)
        buf = first.keys.new_zeros((rows, 1, cap, 1))
        cache.__dict__["_pipeserve_phantoms"] = buf
    _set_phantoms(cache, layers, phantoms, buf, rows, need, int(buf.shape[-2]))


def _set_phantoms(
    cache: Any,
    layers: Any,
    phantoms: Sequence[int],
    buf: torch.Tensor,
    rows: int,
    need: int,
    cap: int,
) -> None:
    view = buf.narrow(-2, 0, need)
    cache.__dict__["_pipeserve_phantom_state"] = (view, buf, rows, need, cap)
    for i in phantoms:
        layers[i].keys = layers[i].values = view
