"""Loading a generation stage's units into the Hugging Face model skeleton (see
:mod:`.gen_stage`): the plan's tensors for those units, from the shard loader."""

from __future__ import annotations

import torch
from torch import nn

from .errors import CheckpointError
from .hf_keys import hf_checkpoint_keys
from .load import CheckpointIndex, ReadStats, read_tensors
from .plan import Plan

__all__ = ["load_units"]


def load_units(
    model: nn.Module,
    plan: Plan,
    names: list[str],
    device: torch.device,
    stats: ReadStats,
    index: int,
    *,
    huge_pages: bool = True,
) -> None:
    """Load units ``names`` of stage ``index`` of ``plan`` into ``model`` (the HF skeleton, on
    meta) from the checkpoint: only their tensors are read, a tied tensor once for every slot;
    real buffers go to ``device`` (weights on the CPU in huge pages unless ``huge_pages`` is
    False: :mod:`.host_arena`).  Raises :class:`CheckpointError` if a tensor stays empty."""
    ckpt = CheckpointIndex.open(plan.source.checkpoint)
    hf_checkpoint_keys(model, ckpt)
    wanted: dict[str, tuple[str, list[int], torch.dtype]] = {}
    slots: dict[int, list[tuple[nn.Module, str]]] = {}  # tied: one read, every slot set
    first: dict[int, str] = {}
    for unit in names:
        for mod_name, mod in model.get_submodule(unit).named_modules(prefix=unit):
            for attr, p in mod._parameters.items():
                if p is None:
                    continue
                slots.setdefault(id(p), []).append((mod, attr))
                if id(p) not in first:
                    pname = f"{mod_name}.{attr}"
                    first[id(p)] = pname
                    aliases = plan.tied.get(pname, [])
                    wanted[pname] = (ckpt.resolve(pname, aliases), list(p.shape), p.dtype)
    loaded = read_tensors(ckpt, wanted, device, stats, huge_pages=huge_pages)
    for pid, pname in first.items():
        param = nn.Parameter(loaded[pname], requires_grad=False)
        for mod, attr in slots[pid]:
            mod._parameters[attr] = param
    for mod in model.modules():
        for bname, b in list(mod._buffers.items()):
            if b is not None and not b.is_meta:
                mod._buffers[bname] = b.to(device)
        for attr, val in list(vars(mod).items()):
            real = isinstance(val, torch.Tensor) and not val.is_meta
            if real and not isinstance(val, nn.Parameter):
                setattr(mod, attr, val.to(device))
    for n in names:
        left = [pn for pn, p in model.get_submodule(n).named_parameters() if p.is_meta]
        if left:
            raise CheckpointError(f"stage {index}: {n} has tensors without values: {left}")
