"""The generation ring's messages: one typed class per kind, encoded and decoded here only.

On the wire (:class:`~pipeline_core.transport.Channel`) a message is a list: its kind's op
code, then its fields in declaration order (the transport gives lists back as tuples).
:func:`encode` and :func:`decode` are the only code that knows this layout; everything else
handles the dataclasses.

Kinds (who sends them):

* :class:`Prefill`, :class:`Decode` -- a group's step, stage ``k`` -> ``k+1``;
* :class:`Tokens` -- the last stage's chosen token ids, back to stage 0;
* :class:`Fail` -- a stage failed on a group's step (passed on to stage 0);
* :class:`Release`, :class:`Merge` -- stage 0 drops a group's caches, or appends one group's
  rows to another, on every stage;
* :class:`Stats` -- per-stage cache figures, each stage appending its own;
* :class:`Ping` -- keep-alive around an idle ring; :class:`Stop` -- every stage ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from .errors import TransportError
from .transport import StageFailure

__all__ = [
    "Decode",
    "Fail",
    "Merge",
    "Ping",
    "Prefill",
    "Release",
    "RingMessage",
    "Stats",
    "Stop",
    "Tokens",
    "decode",
    "encode",
]


@dataclass(frozen=True, slots=True)
class Prefill:
    """Start group ``group``: its padded prompts, their sampling rows (last stage), the
    decoder tokens of a replayed encoder-decoder request, and each pass's payload."""

    group: int
    ids: torch.Tensor
    """``[rows, width]`` prompt ids (decoder-only: left-padded; encoder input: right-padded)."""
    mask: torch.Tensor
    """``[rows, width]`` attention mask of ``ids``."""
    floats: torch.Tensor
    """``[rows, len(FLOAT_COLUMNS)]`` (:func:`~pipeline_core.sampling.encode_rows`)."""
    ints: torch.Tensor
    """``[rows, len(INT_COLUMNS)]``."""
    decoder_prefix: torch.Tensor | None
    """``[rows, k]`` tokens generated before a replay (encoder-decoder only), else None."""
    payloads: tuple[Any, ...]
    """One wire payload per pass (decoder-only: 1, encoder-decoder: 2); None before stage 0."""


@dataclass(frozen=True, slots=True)
class Decode:
    """One decode step of group ``group``: keep rows ``keep`` (None: all), append ``tokens``."""

    group: int
    keep: torch.Tensor | None
    tokens: torch.Tensor
    """``[rows]`` the token each kept row chose last."""
    payloads: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Tokens:
    """Last stage -> stage 0: each row's next token."""

    group: int
    tokens: torch.Tensor


@dataclass(frozen=True, slots=True)
class Fail:
    """A stage failed on group ``group``'s step; every later stage drops the group."""

    group: int
    error: str


@dataclass(frozen=True, slots=True)
class Release:
    """Drop group ``group``'s caches."""

    group: int


@dataclass(frozen=True, slots=True)
class Merge:
    """Append group ``other``'s rows (and caches) to group ``group``."""

    group: int
    other: int


@dataclass(frozen=True, slots=True)
class Stats:
    """Per-stage figures so far (stage order), each a tuple of ``STATS_FIELDS`` values."""

    stages: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True, slots=True)
class Ping:
    """Keep-alive: every receive completes before the data-plane timeout."""


@dataclass(frozen=True, slots=True)
class Stop:
    """Every stage stops serving (it comes back round to stage 0)."""


RingMessage = Prefill | Decode | Tokens | Fail | Release | Merge | Stats | Ping | Stop

_OPS: dict[type, int] = {
    Prefill: 1,
    Decode: 2,
    Release: 3,
    Stats: 4,
    Stop: 5,
    Tokens: 6,
    Fail: 7,
    Merge: 8,
    Ping: 9,
}
_KINDS = {op: cls for cls, op in _OPS.items()}
_FIELDS = {cls: tuple(f.name for f in fields(cls)) for cls in _OPS}
"""Each kind's field names (``dataclasses.fields`` costs microseconds a call, twice a hop)."""


def encode(msg: RingMessage) -> list[Any]:
    """The wire form of ``msg``: ``[op, *fields]``."""
    op = _OPS.get(type(msg))
    if op is None:
        raise TypeError(f"not a ring message: {type(msg).__name__}")
    if isinstance(msg, Fail):  # the transport carries text as a StageFailure
        return [op, msg.group, StageFailure(msg.error)]
    return [op, *[getattr(msg, name) for name in _FIELDS[type(msg)]]]


def decode(values: Sequence[Any]) -> RingMessage:
    """The message a wire list holds; raises :class:`TransportError` when it is none."""
    if not values or values[0] not in _KINDS:
        head = values[0] if values else "nothing"
        raise TransportError(f"unknown ring message kind {head!r}")
    cls = _KINDS[values[0]]
    args = list(values[1:])
    if len(args) != len(_FIELDS[cls]):
        raise TransportError(
            f"ring message {cls.__name__} has {len(args)} fields, expected {len(_FIELDS[cls])}"
        )
    if cls is Fail:
        failure = args[1]
        args[1] = failure.message if isinstance(failure, StageFailure) else str(failure)
    if cls is Stats:
        args[0] = tuple(tuple(s) for s in args[0])
    return cls(*args)
