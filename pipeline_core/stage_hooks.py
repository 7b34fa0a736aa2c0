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
    "around",
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


@functools.cache
def _slots(cls: type) -> tuple[int, dict[str, int], tuple[str, ...]] | None:
    """How a call of ``cls.forward`` binds, worked out once per class, so that :func:`capture`
    and :func:`inject` need not run ``Signature.bind`` (~50 us a call on the token's path, where
    the CPU caches are cold after the layers' matmuls): ``(n, keywords, names)`` -- positional
    arguments ``1..n-1`` (0 is ``self``) bind to the parameters of those positions, a keyword
    argument to ``keywords[name]`` (absent: it goes into ``**kwargs``), ``names[pos]`` is
    position ``pos``'s name.  None: a signature the fast path does not cover (a positional-only
    parameter after ``self``), which binds as before."""
    sig, _ = _signature(cls)
    kinds = inspect.Parameter
    names = tuple(sig.parameters)
    n = 0
    keywords: dict[str, int] = {}
    for i, p in enumerate(sig.parameters.values()):
        if p.kind is kinds.POSITIONAL_ONLY and i > 0:
            return None
        if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD):
            n = i + 1
        if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY):
            keywords[p.name] = i
    return n, keywords, names


def bind(fn: Callable[..., Any], mod: nn.Module) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return fn(mod, *args, **kwargs)

    return forward


def around(
    mod: nn.Module,
    inner: Callable[..., Any],
    pre: Callable[[nn.Module, tuple, dict], tuple[tuple, dict] | None],
    post: Callable[[nn.Module, tuple, Any], Any],
) -> Callable[..., Any]:
    """``mod``'s forward: ``inner`` between ``pre`` and ``post``, which act as a forward
    pre-hook (with kwargs) and a forward hook would (``pre`` may return new ``(args, kwargs)``,
    ``post`` a new output), without registering hooks: a module with hooks takes
    ``nn.Module``'s slow call path, ~15-25 us more per unit call on the token's path (issue 23;
    a stage calls every unit of the model each step)."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        got = pre(mod, args, kwargs)
        if got is not None:
            args, kwargs = got
        out = inner(*args, **kwargs)
        got = post(mod, args, out)
        return out if got is None else got

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
    """The arguments of this call that earlier units of the pass produced (always the first),
    by parameter position, in the signature's order."""
    slots = _slots(type(mod))
    if slots is None:
        sig, index = _signature(type(mod))
        bound = sig.bind(mod, *args, **kwargs)
        pairs = [(index[name], v) for name, v in bound.arguments.items()]
    else:
        n, keywords, _ = slots
        pairs = [(j, v) for j, v in enumerate(args[: n - 1], start=1)]
        pairs += [(keywords[k], v) for k, v in kwargs.items() if k in keywords]
        pairs.sort(key=lambda pv: pv[0])
    return tuple(
        (pos, v)
        for pos, v in pairs
        if isinstance(v, torch.Tensor) and (pos == 1 or id(v) in produced)
    )


def inject(
    mod: nn.Module, args: tuple, kwargs: dict, carry: tuple[tuple[int, torch.Tensor], ...]
) -> tuple[tuple, dict]:
    """This call's arguments with ``carry`` (see :func:`capture`) put in their places."""
    slots = _slots(type(mod))
    if slots is not None:
        n, _, names = slots
        new_args, new_kwargs = list(args), dict(kwargs)
        for pos, t in carry:
            if pos < 0:  # an earlier unit's output (see PassCtx.outputs)
                continue
            if pos - 1 < len(new_args) and pos < n:
                new_args[pos - 1] = t
            else:  # a keyword parameter (capture never gives one of *args / **kwargs)
                new_kwargs[names[pos]] = t
        return tuple(new_args), new_kwargs
    sig, _ = _signature(type(mod))
    bound = sig.bind(mod, *args, **kwargs)
    names = list(sig.parameters)
    for pos, t in carry:
        if pos >= 0:  # negative: an earlier unit's output (see PassCtx.outputs)
            bound.arguments[names[pos]] = t
    return tuple(bound.args[1:]), dict(bound.kwargs)
