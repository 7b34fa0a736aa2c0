"""The hooks' side of a generation stage's partial pass (see :mod:`.gen_stage`): what travels
between stages for one pass, and the helpers that capture a call's arguments at the point
where this stage stops and inject them where the next one starts.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "PassCtx",
    "Payload",
    "bind",
    "capture",
    "inject",
    "meta_buffers",
    "meta_experts",
    "meta_key",
    "out_tensors",
    "to_meta",
    "unwrap",
]


@dataclass
class Payload:
    """What travels between stages for one pass.

    ``call`` is the index of the hooked unit call where the sender stopped (the receiver
    injects there); ``carry`` is (parameter position, tensor) for that call -- a negative
    position ``-1 - k`` instead carries the output of call ``k``, which the model combines
    later (GPT-2's token embeddings, computed before ``wpe``).  ``call == DONE``
    means the pass is complete and ``carry[0][1]`` is its output (the encoder output).
    """

    call: int
    carry: tuple[tuple[int, torch.Tensor], ...]

    DONE = -1

    def to_wire(self) -> tuple[Any, ...]:
        return (self.call, tuple(i for i, _ in self.carry), tuple(t for _, t in self.carry))

    @classmethod
    def from_wire(cls, v: Any, device: torch.device | None = None) -> Payload | None:
        if v is None:
            return None
        call, idx, tensors = v
        if device is not None:
            tensors = [t.to(device) for t in tensors]
        return cls(call, tuple(zip(idx, tensors, strict=True)))


@dataclass
class PassCtx:
    payload: Payload | None
    calls: int = 0
    entered: bool = False
    produced: dict[int, torch.Tensor] = field(default_factory=dict)
    last: tuple[int, torch.Tensor] | None = None
    """(call, first output tensor) of the last unit this stage ran in this pass."""
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    """Outputs of earlier stages' units by call (a negative carry position, see capture)."""
    ahead: Callable[[], Payload] | None = None
    """A pass run ahead of its message: at call ``ahead_call`` the hook calls ``ahead`` for the
    payload (it blocks until the step's message arrives; see ``GenStage.decode_ahead``)."""
    ahead_call: int = -1

    def __post_init__(self) -> None:
        if self.payload is not None:
            self.outputs = {-1 - p: t for p, t in self.payload.carry if p < 0}


def unwrap(mod: nn.Module) -> Callable[..., Any]:
    return type(mod).forward


@functools.cache
def _signature(cls: type) -> tuple[inspect.Signature, dict[str, int]]:
    """``cls.forward``'s signature and each parameter's position, once per class:
    ``inspect.signature`` of a decorated forward (Hugging Face wraps most) costs tens of
    microseconds, and a stage binds the call it stops at and the one it starts at every step."""
    sig = inspect.signature(cls.forward)
    return sig, {name: i for i, name in enumerate(sig.parameters)}


def bind(fn: Callable[..., Any], mod: nn.Module) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return fn(mod, *args, **kwargs)

    return forward


@contextmanager
def meta_buffers(mod: nn.Module) -> Iterator[None]:
    """For the ``with`` block, every real buffer and plain tensor attribute under ``mod`` is a
    meta tensor of its shape (a skipped unit's code may combine them with its inputs)."""
    saved: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    for m in mod.modules():
        for table in (m._buffers, vars(m)):
            for k, v in list(table.items()):
                real = isinstance(v, torch.Tensor) and not v.is_meta
                if real and not isinstance(v, nn.Parameter):
                    saved.append((table, k, v))
                    table[k] = torch.empty_like(v, device="meta")
    try:
        yield
    finally:
        for table, k, v in saved:
            table[k] = v


@contextmanager
def meta_experts(model: nn.Module) -> Iterator[None]:
    """Mixture-of-experts layers run ``batched_mm`` for the ``with`` block: ``grouped_mm``
    (their default) has no meta kernel for float32 (the planner's fake runs switch the same
    way, see :func:`~pipeline_core.source.build_skeleton`)."""
    impl = getattr(model.config, "_experts_implementation", None)
    if impl != "grouped_mm" or not hasattr(model, "set_experts_implementation"):
        yield
        return
    model.set_experts_implementation("batched_mm")
    try:
        yield
    finally:
        model.set_experts_implementation(impl)


def to_meta(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return torch.empty_like(v, device="meta")
    if type(v).__name__.endswith("Cache"):
        return None
    return v


def meta_key(v: Any) -> Hashable:
    """What a meta-device run of a call with arguments ``v`` can depend on: tensors' dtypes and
    shapes (never their values), plain values, containers' structure.  A cache (``to_meta``
    turns it into None) counts by its type; any other object as itself -- the key holds it, so
    its ``id`` cannot pass to another object while the key is cached (an ``id`` alone could,
    once the object is freed) -- or, unhashable, as a key nothing else equals: both only cost
    misses (see :meth:`~pipeline_core.gen_stage.GenStage._shadow`)."""
    if isinstance(v, torch.Tensor):
        return (v.dtype, tuple(v.shape))
    if v is None or isinstance(v, int | float | str):
        return (type(v), v)
    if isinstance(v, tuple | list):
        return (type(v), *(meta_key(x) for x in v))
    if isinstance(v, dict):
        return (dict, *((k, meta_key(x)) for k, x in v.items()))
    if type(v).__name__.endswith("Cache"):
        return type(v)
    try:
        hash(v)
    except TypeError:
        return object()
    return (type(v), v)


def out_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, tuple | list):
        return [t for t in out if isinstance(t, torch.Tensor)]
    if hasattr(out, "to_tuple"):
        return [t for t in out.to_tuple() if isinstance(t, torch.Tensor)]
    return []


def capture(
    mod: nn.Module, args: tuple, kwargs: dict, produced: dict[int, torch.Tensor]
) -> tuple[tuple[int, torch.Tensor], ...]:
    """The arguments of this call that earlier units of the pass produced (always the first)."""
    sig, index = _signature(type(mod))
    bound = sig.bind(mod, *args, **kwargs)
    out = []
    for name, v in bound.arguments.items():
        pos = index[name]
        if isinstance(v, torch.Tensor) and (pos == 1 or id(v) in produced):
            out.append((pos, v))
    return tuple(out)


def inject(
    mod: nn.Module, args: tuple, kwargs: dict, carry: tuple[tuple[int, torch.Tensor], ...]
) -> tuple[tuple, dict]:
    sig, _ = _signature(type(mod))
    bound = sig.bind(mod, *args, **kwargs)
    names = list(sig.parameters)
    for pos, t in carry:
        if pos >= 0:  # negative: an earlier unit's output (see PassCtx.outputs)
            bound.arguments[names[pos]] = t
    return tuple(bound.args[1:]), dict(bound.kwargs)
