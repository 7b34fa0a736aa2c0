"""Per-step Python that a generation stage need not repeat (issue 23).

Every stage runs the model's own ``forward`` each decode step, so Python that ``generate``
pays once per token a pipeline pays once per stage per token.  The largest such piece found by
the step breakdown (:mod:`~pipeline_core.step_timing`): Hugging Face decoders iterate
``self.layers[: self.config.num_hidden_layers]``, and slicing an ``nn.ModuleList`` builds a new
``ModuleList`` (a ``Module.__init__`` plus one ``add_module`` per layer): about 0.3-0.8 ms a
step for 12 layers on the 2-core VM, more than a hop.  :func:`cache_module_list_slices` makes
the stage's lists return the same slice object every time (the layers never change once a stage
is built).
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["cache_module_list_slices"]


class _SliceCachingModuleList(nn.ModuleList):
    """A ``ModuleList`` whose slices are built once (keyed by the slice and the list length)."""

    def __getitem__(self, idx: Any) -> Any:
        if not isinstance(idx, slice):
            return super().__getitem__(idx)
        cache = self.__dict__.setdefault("_pipeserve_slices", {})
        key = (idx.start, idx.stop, idx.step, len(self._modules))
        got = cache.get(key)
        if got is None:
            got = cache[key] = super().__getitem__(idx)
        return got


def cache_module_list_slices(model: nn.Module) -> int:
    """Make every plain ``nn.ModuleList`` under ``model`` cache its slices; returns how many.
    A slice is a plain (unregistered) list object: state dicts and ``modules()`` see nothing new."""
    n = 0
    for m in model.modules():
        if type(m) is nn.ModuleList:
            m.__class__ = _SliceCachingModuleList
            n += 1
    return n
