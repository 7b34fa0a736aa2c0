"""Exceptions raised by pipeline_core.

Every error that can reach a user says what was wrong and what to do about it.
``ValueError`` subclasses mean bad arguments; ``RuntimeError`` subclasses mean bad state.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "DoesNotFit", "PlanError", "TraceError", "TransportError"]


class PlanError(ValueError):
    """A split policy or plan cannot be satisfied (too many stages, unknown module, ...)."""


class DoesNotFit(PlanError):
    """The model does not fit the workers' memory; the message says how much is missing."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match the model."""


class TraceError(RuntimeError):
    """The model could not be captured by ``torch.export`` or split as requested."""


class TransportError(RuntimeError):
    """The data plane received something that does not match what was expected."""
