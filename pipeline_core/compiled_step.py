"""An opt-in compiled decode step for a generation stage (issue 23, item 3).

gpt-fast's pattern, fitted to a stage that runs the Hugging Face model's own ``forward`` with
hooks (:mod:`.gen_stage`): the hooks, the embeddings, masks and head stay eager, and each
decoder layer the stage owns runs a ``torch.compile``'d call (``fullgraph=True``,
``dynamic=False``; Inductor on CPU, ``mode="reduce-overhead"`` -- CUDA graphs -- on CUDA) on a
preallocated, bucketed KV cache (:mod:`.static_cache`).

* **Decode steps only**: a layer call with one new token per row and a cache already filled
  (a prefill, or a group on an encoder-decoder, stays eager).
* **One graph per bucket, shared by the layers**: the layer module is an input of the compiled
  function (its parameters are graph inputs), so every layer of a class reuses the graph of a
  (row bucket, length bucket); rows are padded to their bucket by repeating row 0 (rows are
  independent; the padding rows' outputs are dropped), the mask is widened to the length
  bucket with the unused tail masked out.  Recompiles are bounded by the buckets a stage meets;
  ``torch._dynamo``'s recompile limit is raised to that number.
* **Compile time** is the first call of a bucket's extra time, logged once per bucket and kept
  in :attr:`CompiledDecode.compile_s`.
* **CUDA** (not yet run on a GPU: this was built on a CPU-only machine): CUDA graphs
  (``reduce-overhead``) with the bucket buffers marked static (the graph writes them in place)
  and each layer's output cloned (the next layer replays the same graph).
* **Never fails a request**: a family that cannot be compiled whole (a graph break under
  ``fullgraph``, an unsupported cache, any error while compiling) falls back to the eager
  layer for good, with one log line.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from .kv_cache import _classes as kv_classes
from .stage_hooks import unwrap
from .static_cache import bucket_layer_class, len_bucket, row_bucket

__all__ = ["CompileSettings", "CompiledDecode"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class CompileSettings:
    """How a stage compiles its decode steps."""

    row_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    """Row counts a graph is built for; a step with more rows than the largest runs eager."""
    min_len: int = 64
    """Smallest length bucket; the others double it."""
    max_len: int = 8192
    """A cache longer than this runs eager (bounds the length buckets)."""
    min_rows: int = 1
    """Steps with fewer rows run eager (where the compiled step does not win)."""

    @property
    def max_graphs(self) -> int:
        """Graphs one layer class may need: row buckets x length buckets."""
        return len(self.row_buckets) * len(_len_buckets(self.min_len, self.max_len))


def _len_buckets(min_len: int, max_len: int) -> list[int]:
    out = [min_len]
    while out[-1] < max_len:
        out.append(out[-1] * 2)
    return out


class _Slot:
    """The cache a compiled layer call sees: it writes the step's keys and values at ``pos``
    of the bucket buffers and attends over all of them (the mask hides the unused tail)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        self.k, self.v, self.pos = k, v, pos

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, self.pos, key_states)
        self.v.index_copy_(2, self.pos, value_states)
        return self.k, self.v


def _layer_step(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
    """What is compiled: the layer's own forward (no hooks: they run outside, eager)."""
    return unwrap(mod)(mod, *args, **kwargs)


class CompiledDecode:
    """Compiled decode steps for the decoder layers ``layers`` (cache index -> module) of
    stage ``index`` (see module docstring)."""

    def __init__(
        self,
        index: int,
        layers: dict[int, nn.Module],
        device: torch.device,
        settings: CompileSettings,
        float_mask: torch.dtype | None = None,
    ) -> None:
        self.index, self.device, self.settings = index, device, settings
        self.float_mask = float_mask
        """The dtype of an additive mask (eager attention); None: a boolean one (SDPA)."""
        self.off: str | None = None
        """Why this stage stopped compiling (None: it compiles)."""
        self.compile_s: dict[tuple[str, int, int], float] = {}
        """Compile time by (layer class, row bucket, length bucket)."""
        self.compiled_steps = 0
        """Decode-step layer calls run compiled (for tests and stats)."""
        self.eager_steps = 0
        """Decode-step layer calls run eager (outside the buckets, too few rows, a mask it
        cannot widen, a cache layer of another kind, a failed compile)."""
        self._noted: set[str] = set()  # reasons already logged
        self.cuda_graphs = device.type == "cuda"
        mode = "reduce-overhead" if self.cuda_graphs else None
        self._fn = torch.compile(_layer_step, fullgraph=True, dynamic=False, mode=mode)
        dyn = torch._dynamo.config
        dyn.recompile_limit = max(dyn.recompile_limit, settings.max_graphs)
        dyn.accumulated_recompile_limit = max(
            dyn.accumulated_recompile_limit, 4 * settings.max_graphs
        )
        # (the model's mask, rows, used) that _shared was made for: the mask object itself is
        # kept (compared by identity), so a later step's new mask cannot reuse its id
        self._step: tuple[torch.Tensor | None, int, int] | None = None
        self._shared: tuple[torch.Tensor, torch.Tensor] | None = None  # (mask, pos)
        for i, mod in layers.items():
            sig = inspect.signature(unwrap(mod))
            cache_kw = next((k for k in ("cache", "past_key_values") if k in sig.parameters), None)
            if cache_kw is None or "attention_mask" not in sig.parameters:
                log.info(
                    "[stage %d] decode stays eager: %s takes no cache/attention_mask argument",
                    index,
                    type(mod).__name__,
                )
                self.off = "layer signature"
                return
            mod.forward = self._wrap(i, mod, sig, cache_kw)

    def _wrap(self, i: int, mod: nn.Module, sig: inspect.Signature, cache_kw: str) -> Any:
        eager = unwrap(mod)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.off is None:
                out = self._try(i, mod, sig, cache_kw, args, kwargs)
                if out is not None:
                    return out[0]
            return eager(mod, *args, **kwargs)

        return forward

    def _try(
        self,
        i: int,
        mod: nn.Module,
        sig: inspect.Signature,
        cache_kw: str,
        args: tuple,
        kwargs: dict,
    ) -> tuple[Any] | None:
        """The compiled call's output (in a 1-tuple), or None: run this call eager."""
        bound = sig.bind(mod, *args, **kwargs)
        a = bound.arguments
        hidden, cache = list(a.values())[1], a.get(cache_kw)
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[1] != 1:
            return None  # not a decode step
        layers = getattr(cache, "layers", None)
        if type(cache).__name__ != "DynamicCache" or layers is None:
            return None
        layer = layers[i]
        if not getattr(layer, "is_initialized", False):
            return None
        cls = bucket_layer_class()
        if not isinstance(layer, cls):
            if type(layer) not in _plain_layers():  # a sliding window, a quantized cache ...
                self._note(f"its {type(layer).__name__} cache layers are not compiled")
                self.eager_steps += 1
                return None
            s = self.settings
            layer = layers[i] = cls.from_layer(layer, s.row_buckets, s.min_len)
        rows, used = int(hidden.shape[0]), layer.used
        need = used + 1
        rb = row_bucket(rows, self.settings.row_buckets)
        if used == 0 or rb is None or rows < self.settings.min_rows or need > self.settings.max_len:
            self.eager_steps += 1
            return None
        mask = a.get("attention_mask")
        shared = self._mask_and_pos(mask, rows, rb, used, len_bucket(need, self.settings.min_len))
        if shared is None:
            self._note(f"a {None if mask is None else tuple(mask.shape)} mask it cannot widen")
            self.eager_steps += 1
            return None
        kbuf, vbuf = layer.buffers(layer.keys, layer.values, need)
        lb = kbuf.shape[-2]
        if self.cuda_graphs:  # written in place by the graph: its address must not change
            torch._dynamo.mark_static_address(kbuf)
            torch._dynamo.mark_static_address(vbuf)
        pad = _row_padder(rows, rb)
        for k in list(a):
            if k not in ("self", cache_kw, "attention_mask"):
                a[k] = tree_map(pad, a[k])
        a[cache_kw] = _Slot(kbuf, vbuf, shared[1])
        a["attention_mask"] = shared[0]
        key = (type(mod).__name__, rb, lb)
        first = key not in self.compile_s
        t0 = time.perf_counter()
        try:
            out = self._fn(mod, bound.args[1:], bound.kwargs)
        except Exception as e:  # never fail a request: this stage decodes eager from now on
            self.off = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            log.warning(
                "[stage %d] compiled decode off, running eager: %s could not be compiled (%s)",
                self.index,
                type(mod).__name__,
                self.off,
            )
            self.eager_steps += 1
            return None
        if first:
            self.compile_s[key] = time.perf_counter() - t0
            log.info(
                "[stage %d] compiled the decode step of %s for %d rows x %d tokens in %.1f s",
                self.index,
                key[0],
                rb,
                lb,
                self.compile_s[key],
            )
        layer.advance(rows, need)
        self.compiled_steps += 1
        if self.cuda_graphs:  # the next layer's replay of the graph overwrites its outputs
            out = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)
        if rb == rows:
            return (out,)
        if isinstance(out, torch.Tensor):
            return (out[:rows],)
        return (tuple(t[:rows] if isinstance(t, torch.Tensor) else t for t in out),)

    def _note(self, why: str) -> None:
        """Log once per stage and reason why decode steps run eager."""
        if why not in self._noted:
            self._noted.add(why)
            log.info("[stage %d] some decode steps stay eager: %s", self.index, why)

    def _mask_and_pos(
        self, mask: torch.Tensor | None, rows: int, rb: int, used: int, lb: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This step's mask ``[rb, 1, 1, lb]`` and write position, shared by the stage's layers
        (None: a mask this step cannot widen; run eager)."""
        last = self._step
        if (
            last is not None
            and last[0] is mask
            and last[1:] == (rows, used)
            and self._shared is not None
            and self._shared[0].shape[-1] == lb
        ):
            return self._shared
        need = used + 1
        if mask is None:
            m = (torch.arange(lb, device=self.device) < need).view(1, 1, 1, lb)
            m = m.expand(rb, 1, 1, lb).contiguous()  # the same strides as a widened mask
            if self.float_mask is not None:  # eager attention adds its mask
                m = torch.zeros(m.shape, dtype=self.float_mask, device=self.device).masked_fill(
                    ~m, torch.finfo(self.float_mask).min
                )
        else:
            if mask.dim() != 4 or mask.shape[-1] != need or mask.shape[-2] != 1:
                return None
            fill: Any = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
            m = F.pad(mask, (0, lb - need), value=fill)
            if m.shape[0] == rows and rb != rows:
                m = _row_padder(rows, rb)(m)
            m = m.expand(rb, *m.shape[1:]).contiguous()
        pos = torch.tensor([used], dtype=torch.long, device=self.device)
        self._step, self._shared = (mask, rows, used), (m, pos)
        return self._shared


def _plain_layers() -> tuple[type, ...]:
    """The full-attention cache layers a bucket layer may take over."""
    base, growing, _ = kv_classes()
    return (base, growing)


def _row_padder(rows: int, rb: int) -> Any:
    """Pads a tensor of ``rows`` rows to ``rb`` by repeating row 0 (others pass)."""

    def pad(t: Any) -> Any:
        if rb == rows or not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != rows:
            return t
        return torch.cat([t, t[:1].expand(rb - rows, *t.shape[1:])])

    return pad


def attach(
    index: int,
    layers: Sequence[nn.Module],
    owned: Sequence[int],
    device: torch.device,
    settings: CompileSettings | bool | None,
    config: Any,
) -> CompiledDecode | None:
    """A stage's :class:`CompiledDecode` for its owned layers ``owned`` (indices into
    ``layers``) of a model with ``config``; None when ``settings`` is off (``None``/``False``;
    ``True``: the default settings) and, with one log line, where it does not apply."""
    if not settings:
        return None
    if settings is True:
        settings = CompileSettings()
    if getattr(config, "is_encoder_decoder", False):
        log.info("[stage %d] decode stays eager: encoder-decoder models are not compiled", index)
        return None
    if not owned:
        return None
    attn = getattr(config, "_attn_implementation", None) or "sdpa"
    if attn not in ("sdpa", "eager"):
        log.info("[stage %d] decode stays eager: attention %r is not compiled", index, attn)
        return None
    dtype = next(layers[owned[0]].parameters()).dtype
    float_mask = dtype if attn == "eager" else None
    return CompiledDecode(index, {i: layers[i] for i in owned}, device, settings, float_mask)
