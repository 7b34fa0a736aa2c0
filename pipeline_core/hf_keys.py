"""Where a Hugging Face model's tensors are in its checkpoint: renamed keys and tensors
stored in pieces, by the library's own conversion rules (see :func:`hf_checkpoint_keys`)."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError
from .load import CheckpointIndex, Merge

__all__ = ["hf_checkpoint_keys"]


def hf_checkpoint_keys(model: nn.Module, ckpt: CheckpointIndex) -> None:
    """Map ``model``'s tensor names onto the keys of ``ckpt`` where they differ.

    transformers 5 keeps legacy key names in checkpoints (``vit.encoder.layer.0...``) and renames
    them on load (``vit.layers.0...``); a checkpoint of the base model may also lack (or carry)
    the ``base_model_prefix``; and some tensors are stored in pieces that it merges on load
    (Mixtral's ``experts.N.w1``/``w3`` -> ``experts.gate_up_proj``).  We apply the library's own
    rules to the checkpoint's keys: renames go to ``ckpt.renames``, merges (the pieces in
    order, and the library's conversion operations) to ``ckpt.merges``.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:  # an older transformers: checkpoint keys are module names
        return
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = dict.fromkeys(
        [n for n, _ in model.named_parameters(remove_duplicate=False)]
        + [n for n, _ in model.named_buffers(remove_duplicate=False)],
        True,
    )
    prefix = getattr(model, "base_model_prefix", None) or None
    pieces: dict[str, dict[str, list[str]]] = {}
    for key in ckpt.weight_map:
        new, pattern = rename_source_key(key, renamings, converters, prefix, names)
        if new not in names:
            continue
        if pattern is None:
            if new != key:
                ckpt.renames[new] = key
        else:
            pieces.setdefault(new, {}).setdefault(pattern, []).append(key)
    for target, by_pattern in pieces.items():
        conv = next(c for c in converters if set(by_pattern) <= set(c.source_patterns))
        ordered = {p: sorted(by_pattern[p], key=_natural) for p in conv.source_patterns}
        ckpt.merges[target] = Merge(ordered, _combiner(conv, target, model.config))


def _natural(key: str) -> list[Any]:
    """``experts.10`` after ``experts.9``."""
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", key)]


def _combiner(conv: Any, target: str, config: Any) -> Any:
    def combine(tensors: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        out: dict[str, Any] = {p: list(ts) for p, ts in tensors.items()}
        for op in conv.operations:
            out = op.convert(
                out,
                source_patterns=conv.source_patterns,
                target_patterns=conv.target_patterns,
                full_layer_name=target,
                model=None,
                config=config,
            )
        if len(out) != 1:
            raise CheckpointError(f"merging the pieces of {target!r} gave {len(out)} tensors")
        return next(iter(out.values()))

    return combine
