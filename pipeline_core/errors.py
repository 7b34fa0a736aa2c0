"""Exceptions raised by pipeline_core (every class of the package lives here).

Every error that can reach a user says what was wrong and what to do about it.
``ValueError`` subclasses mean bad arguments; ``RuntimeError`` subclasses mean bad state.
:class:`StageExit`, :class:`StageSkip` and :class:`AheadMiss` never reach a user: they end a
generation stage's part of a forward pass (:mod:`.gen_stage`).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ECHO_CHARS",
    "AheadMiss",
    "CheckpointError",
    "DoesNotFit",
    "GenerationFailed",
    "PlanError",
    "RequestError",
    "ResourceExhausted",
    "StageExit",
    "StageSkip",
    "TraceError",
    "TransportError",
    "UnsupportedModelError",
    "clip",
]


ECHO_CHARS = 80
"""The most of a caller's string an error message repeats back."""


def clip(text: str, n: int = ECHO_CHARS) -> str:
    """``repr(text)`` for an error message, cut to about ``n`` characters: a 1 MB name must
    not come back in a status (it would not even fit gRPC's metadata)."""
    if len(text) <= n:
        return repr(text)
    return f"{text[:n]!r}... ({len(text)} characters)"


class PlanError(ValueError):
    """A split policy or plan cannot be satisfied (too many stages, unknown module, ...)."""


class DoesNotFit(PlanError):
    """The model does not fit the workers' memory; the message says how much is missing."""


class UnsupportedModelError(PlanError):
    """The model cannot generate over the pipeline (says what is supported)."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match the model."""


class TraceError(RuntimeError):
    """The model could not be captured by ``torch.export`` or split as requested."""


class TransportError(RuntimeError):
    """The data plane received something that does not match what was expected."""


class RequestError(ValueError):
    """A request is invalid; the message says which field and what is allowed."""


class ResourceExhausted(RuntimeError):
    """The queue or the KV budget cannot take this request now (or ever, says which)."""


class GenerationFailed(RuntimeError):
    """The request failed inside the pipeline (a stage raised, or the pipeline broke)."""


class StageExit(Exception):
    """Raised in a hook where this stage's part of a pass ends.

    ``call``: the index of the hooked unit call where the next stage goes on; ``carry``:
    (parameter position, tensor) pairs of that call (see :class:`~.stage_hooks.Payload`).
    """

    def __init__(self, call: int, carry: tuple[tuple[int, Any], ...]) -> None:
        super().__init__(call)
        self.call = call
        self.carry = carry


class StageSkip(Exception):
    """This stage owns nothing of the pass at the point where the previous stage stopped."""


class AheadMiss(Exception):
    """A decode step prepared ahead of its message met another message (another group, rows
    leaving, a control message): the preparation is dropped (``GenStage.decode_ahead``)."""
