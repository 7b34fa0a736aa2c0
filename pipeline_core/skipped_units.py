"""How a generation stage runs the units it does not own (see :mod:`.gen_stage`): a layer
passes its input hidden states through, any other module returns zeros of its output's shape --
both worked out on the meta device, once per shape (or per layer class)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .errors import UnsupportedModelError
from .stage_hooks import meta_buffers, meta_experts, meta_key, to_meta, unwrap

__all__ = ["SkippedUnits"]


class SkippedUnits:
    """:class:`~pipeline_core.gen_stage.GenStage`'s runners of the units it skips."""

    model: nn.Module
    index: int
    device: torch.device
    _names: dict[int, str]
    _structure: dict[type, int]
    _shadows: dict[Hashable, Any]

    def _on_meta(self, mod: nn.Module, what: str, *args: Any, **kwargs: Any) -> Any:
        """``mod``'s own forward run on the meta device (inputs, and for the run its real buffers
        too: GPT-Neo's causal mask would otherwise meet meta activations); a failure is a clear
        error naming the unit, never a guess."""
        margs, mkwargs = tree_map(to_meta, (args, kwargs))
        if "use_cache" in mkwargs:
            mkwargs["use_cache"] = False
        try:
            with meta_buffers(mod), meta_experts(self.model):
                return unwrap(mod)(mod, *margs, **mkwargs)
        except Exception as e:
            name = self._names.get(id(mod), type(mod).__name__)
            raise UnsupportedModelError(
                f"stage {self.index}: cannot work out {what} of {name} "
                f"({type(mod).__name__}), which this stage skips: running it on the meta device "
                f"failed with {type(e).__name__}: {e}. Put {name} on a stage with its "
                f"neighbours (--split-at), or report the model"
            ) from e

    def _shadow(self, mod: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """A module this stage does not own: zeros shaped like its output (meta, once a shape)."""
        key = (id(mod), meta_key(args), meta_key(kwargs))
        out = self._shadows.get(key)
        if out is None:
            if len(self._shadows) >= 256:  # keys that change every step (an int position)
                self._shadows.clear()
            out = self._shadows[key] = self._on_meta(mod, "the output shape", *args, **kwargs)
        dev = self.device
        if isinstance(out, torch.Tensor):  # the usual case; tree_map costs ~50 us
            return torch.zeros(out.shape, dtype=out.dtype, device=dev)
        return tree_map(
            lambda t: (
                torch.zeros(t.shape, dtype=t.dtype, device=dev)
                if isinstance(t, torch.Tensor)
                else t
            ),
            out,
        )

    def _passthrough(self, mod: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """A layer this stage does not own: its input hidden states, in the layer's output
        structure (a tensor, or a tuple whose other entries are None), learnt once per layer
        class from a run on the meta device."""
        n = self._structure.get(type(mod))
        if n is None:
            out = self._on_meta(mod, "the output structure", *args, **kwargs)
            n = len(out) if isinstance(out, tuple) else 0
            self._structure[type(mod)] = n
        hidden = args[0] if args else next(iter(kwargs.values()))
        return hidden if n == 0 else (hidden, *([None] * (n - 1)))
