"""One generation group's state on a stage: its rows' ids, the model kwargs holding its KV
cache, and the padding helpers used when groups merge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "GroupState",
    "cache_bytes",
    "cache_layers",
    "lpad",
    "merge_groups",
    "rows_of",
    "select_rows",
]


@dataclass
class GroupState:
    """One micro-batch of sequences (rows leave when done; other groups may merge in)."""

    ids: torch.Tensor
    """Decoder token ids so far, left-padded: ``[rows, length]``."""
    kwargs: dict[str, Any]
    """HF ``model_kwargs``: cache, attention_mask, position_ids, encoder outputs, ..."""
    sampling: Any = None
    """Last stage only: the rows' :class:`~pipeline_core.sampling.Sampler`."""
    ahead_call: int | None = None
    """The hooked call where this group's last decode step came in from the previous stage
    (None: not known, or its next step cannot be prepared ahead; see ``GenStage.decode_ahead``)."""
    phantom_debt: int = 0
    """Tokens the stage's phantom cache layers have yet to move on by: the last pass's, owed
    until the group is next used (``GenStage._settle``), so that the send is not behind it."""
    prepared: Any = None
    """Stage 0: the next decode step's inputs, made while the step was in flight
    (``GenStage.prepare_decode``); None: none."""

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    def take_prepared(self, keep: torch.Tensor | None, tokens: torch.Tensor) -> Any:
        """The model inputs of this decode step, made ahead (``decode_ahead.prepare_decode``),
        with ``tokens`` written in (into the ids and into the model's ``input_ids``, a copy of
        their last column); None: none made, rows leave (``keep``), or the ids they were made
        from are no longer the group's (rows changed, a merge).  Used up either way."""
        prep, self.prepared = self.prepared, None
        if prep is None or keep is not None or prep[0] is not self.ids:
            return None
        _, ids, kwargs, inputs = prep
        if tokens.numel() != ids.shape[0]:
            return None
        tok = tokens.to(ids.device).view(-1)
        ids[:, -1] = tok
        inputs["input_ids"][:, -1] = tok
        self.ids, self.kwargs = ids, kwargs
        return inputs


def select_rows(g: GroupState, keep: torch.Tensor, cache_kw: str) -> None:
    """Keep only rows ``keep`` of ``g`` (ids, cache, masks, encoder output, sampling)."""
    g.ids = g.ids[keep]
    g.kwargs[cache_kw].batch_select_indices(keep)
    for k in ("attention_mask", "position_ids"):
        v = g.kwargs.get(k)
        if isinstance(v, torch.Tensor) and v.shape[0] > 1:
            g.kwargs[k] = v[keep]
    enc = g.kwargs.get("encoder_outputs")
    if enc is not None:
        enc.last_hidden_state = enc.last_hidden_state[keep]
    if g.sampling is not None:
        g.sampling.select(keep.tolist())


def lpad(t: torch.Tensor, n: int, dim: int = 1) -> torch.Tensor:
    """Left-pad ``t`` with zeros to length ``n`` along ``dim``."""
    dim = dim % t.dim()
    missing = n - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def rows_of(v: torch.Tensor | None, g: GroupState) -> torch.Tensor:
    """A group's attention mask / position ids with one row per sequence (None: no padding)."""
    if v is None:
        return torch.ones_like(g.ids)
    return v.expand(g.rows, -1) if v.shape[0] != g.rows else v


def cache_layers(cache: Any) -> list[Any]:
    if hasattr(cache, "self_attention_cache"):
        return [*cache.self_attention_cache.layers, *cache.cross_attention_cache.layers]
    return list(cache.layers)


def merge_groups(a: GroupState, b: GroupState, ca: Any, cb: Any) -> None:
    """Append group ``b``'s rows to ``a``; ``ca``/``cb``: their self-attention caches.  The
    shorter group is left-padded: ids with 0, attention mask and position ids with 0, cache
    entries with zeros that the mask hides."""
    n = max(a.ids.shape[1], b.ids.shape[1])
    for key in ("attention_mask", "position_ids"):
        va, vb = a.kwargs.get(key), b.kwargs.get(key)
        if key == "position_ids" and va is None and vb is None:
            continue  # the model takes no position ids
        va, vb = rows_of(va, a), rows_of(vb, b)
        a.kwargs[key] = torch.cat([lpad(va, n), lpad(vb, n)])
    a.ids = torch.cat([lpad(a.ids, n), lpad(b.ids, n)])
    for la, lb in zip(ca.layers, cb.layers, strict=True):
        if not getattr(la, "is_initialized", False):
            continue
        m = max(la.keys.shape[-2], lb.keys.shape[-2])
        la.keys = torch.cat([lpad(la.keys, m, -2), lpad(lb.keys, m, -2)])
        la.values = torch.cat([lpad(la.values, m, -2), lpad(lb.values, m, -2)])
    if a.sampling is not None and b.sampling is not None:
        a.sampling.extend(b.sampling)


def cache_bytes(groups: list[GroupState], cache_kw: str, layers: int, phantoms: set[int]) -> int:
    """Bytes of the KV tensors ``groups`` hold for the layers a stage owns (not ``phantoms``,
    indices among the decoder's ``layers``)."""
    nbytes = 0
    for g in groups:
        for i, layer in enumerate(cache_layers(g.kwargs[cache_kw])):
            if i % layers in phantoms:
                continue
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    nbytes += t.numel() * t.element_size()
    return nbytes
