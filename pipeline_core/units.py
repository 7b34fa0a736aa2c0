"""Find a model's natural blocks ("units") generically from its module tree.

A unit is the smallest piece a split may put on one stage: an element of a repeated block list
(decoder layers, encoder/decoder blocks, CNN stages) or a module that sits between block lists
(embeddings, final norm, heads).  No per-family table:

* a *block list* is an ``nn.Sequential`` of 2+ children (whatever they are: a chain can be
  cut between any two), or an ``nn.ModuleList`` of 2+ children where one module class makes up
  at least half of them (a list the model may use in any order is only trusted when it looks
  like repeated blocks); the outermost such lists win, so a ``Sequential`` inside a unit (an
  MLP inside a decoder layer) stays inside it -- ``pipeserve plan --units`` lists the result;
* the tree is walked in registration order; containers that hold a block list somewhere below
  are opened, everything else is one unit;
* a module object that appears twice (``encoder.embed_tokens`` is ``shared`` in T5) cannot carry
  a split point; it joins the unit before it, where its computation runs;
* tensors registered directly on an opened container join the unit after them.

Bytes count parameters + buffers (not parameter counts, as PiPPy did); a tensor shared by several
names (tied weights) counts once per unit that uses it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["TensorInfo", "Unit", "find_units", "stage_nbytes", "tensor_table"]


@dataclass(kw_only=True)
class TensorInfo:
    name: str
    shape: list[int]
    dtype: str
    nbytes: int
    persistent: bool = True
    """False for non-persistent buffers: computed at construction, never in a checkpoint."""


@dataclass(kw_only=True)
class Unit:
    name: str
    """Module FQN where a stage may begin (the split point), e.g. ``model.layers.4``."""
    modules: list[str] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)
    nbytes: int = 0
    flops: int = 0
    """FLOPs of this unit's forward on the plan's example inputs (compute cost estimate)."""


def _is_block_list(m: nn.Module) -> bool:
    if not isinstance(m, nn.ModuleList | nn.Sequential) or len(m) < 2:
        return False
    if isinstance(m, nn.Sequential):
        return True  # a chain: every boundary between its children is a valid split point
    _cls, count = Counter(type(c) for c in m.children()).most_common(1)[0]
    return count >= 2 and 2 * count >= len(m)


def tensor_table(model: nn.Module) -> tuple[dict[str, TensorInfo], dict[str, list[str]]]:
    """All tensor names (aliases included) -> info, and the tied groups.

    Returns ``(infos, groups)`` where ``groups[name]`` lists every name of the same tensor,
    the first registered name first.
    """
    infos: dict[str, TensorInfo] = {}
    by_id: dict[int, list[str]] = {}
    non_persistent: set[str] = set()
    for mname, mod in model.named_modules(remove_duplicate=False):
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            non_persistent.add(f"{mname}.{b}" if mname else b)
    named = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        infos[name] = TensorInfo(
            name=name,
            shape=list(t.shape),
            dtype=str(t.dtype).removeprefix("torch."),
            nbytes=t.numel() * t.element_size(),
            persistent=name not in non_persistent,
        )
        by_id.setdefault(id(t), []).append(name)
    groups = {n: names for names in by_id.values() for n in names}
    return infos, groups


def find_units(model: nn.Module) -> list[Unit]:
    """The model's ordered units (see module docstring)."""
    block_lists: set[int] = set()

    def mark(m: nn.Module) -> None:
        for child in m.children():
            if _is_block_list(child):
                block_lists.add(id(child))
            else:
                mark(child)

    if _is_block_list(model):
        block_lists.add(id(model))
    else:
        mark(model)

    holds_list: dict[int, bool] = {}

    def has_list(m: nn.Module) -> bool:
        if id(m) not in holds_list:
            holds_list[id(m)] = id(m) in block_lists or any(has_list(c) for c in m.children())
        return holds_list[id(m)]

    seen: set[int] = set()
    units: list[Unit] = []
    pending: list[str] = []  # loose tensors waiting for the next unit
    orphans: list[str] = []  # shared modules seen before any unit

    def add_unit(fqn: str, mod: nn.Module) -> None:
        for sub in mod.modules():
            seen.add(id(sub))
        units.append(Unit(name=fqn, modules=[*orphans, fqn], tensors=list(pending)))
        pending.clear()
        orphans.clear()

    def walk(m: nn.Module, prefix: str) -> None:
        for pname, p in list(m._parameters.items()) + list(m._buffers.items()):
            if p is not None:
                pending.append(prefix + pname)
        for name, child in m.named_children():
            fqn = prefix + name
            if id(child) in seen:
                if units:
                    units[-1].modules.append(fqn)
                else:
                    orphans.append(fqn)
            elif id(child) in block_lists:
                seen.add(id(child))
                for i, block in child.named_children():
                    add_unit(f"{fqn}.{i}", block)
            elif has_list(child) or (not block_lists and _single_child(child)):
                seen.add(id(child))
                walk(child, fqn + ".")
            else:
                add_unit(fqn, child)

    if id(model) in block_lists:
        for i, block in model.named_children():
            add_unit(i, block)
    else:
        walk(model, "")
    if pending and units:
        units[-1].tensors.extend(pending)

    model_tensors = dict(model.named_parameters(remove_duplicate=False))
    model_tensors.update(model.named_buffers(remove_duplicate=False))
    prefixes = list(model_tensors)
    for u in units:
        names = list(u.tensors)
        for mod in u.modules:
            names += [n for n in prefixes if n.startswith(mod + ".")]
        u.tensors = list(dict.fromkeys(names))
        u.nbytes = stage_nbytes(model_tensors, u.tensors)
    return units


def _single_child(m: nn.Module) -> bool:
    return len(list(m.children())) == 1 and not m._parameters


def stage_nbytes(tensors: dict[str, torch.Tensor], names: list[str]) -> int:
    """Bytes of the distinct tensors among ``names`` (tied aliases count once)."""
    seen: set[int] = set()
    total = 0
    for n in names:
        t = tensors[n]
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
