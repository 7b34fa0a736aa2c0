"""Cut a batch into microbatches along dim 0, and join the results back."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["check_chunks", "merge_microbatches", "split_microbatches"]

log = logging.getLogger(__name__)


def check_chunks(chunks: int, rows_mixed: str) -> None:
    """Refuse ``chunks > 1`` for a model whose outputs mix rows of the batch (``rows_mixed``:
    the plan's reason, e.g. CLIP's image x text logits), which microbatches would get wrong."""
    if chunks > 1 and rows_mixed:
        raise ValueError(f"chunks={chunks} cannot split this model's batch: {rows_mixed}; use 1")


def split_microbatches(inputs: dict[str, Any], chunks: int) -> list[dict[str, Any]]:
    """Split every tensor input along dim 0 into ``chunks`` pieces (sizes may differ by one).

    Non-tensor inputs are passed to every microbatch unchanged.  When the batch is smaller
    than ``chunks``, fewer microbatches are made (one row each).  ``chunks == 1`` passes the
    inputs whole, whatever their sizes.

    Raises:
        ValueError: ``chunks`` < 1, no tensor input, an empty batch, or (``chunks > 1``)
            tensors that disagree on the batch size.
    """
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    batch = {k: v.shape[0] for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim()}
    if not batch:
        raise ValueError("at least one input must be a tensor with a batch dimension")
    if chunks == 1 and all(batch.values()):
        return [dict(inputs)]  # nothing to cut: sizes may differ (CLIP: texts x images)
    sizes = set(batch.values())
    if len(sizes) != 1:
        raise ValueError(f"inputs disagree on the batch size (dim 0): {batch}")
    size = sizes.pop()
    if size == 0:
        raise ValueError("empty batch")
    n = min(chunks, size)
    if n < chunks:
        log.info("batch of %d split into %d microbatches instead of %d", size, n, chunks)
    pieces = {k: (torch.tensor_split(v, n) if k in batch else [v] * n) for k, v in inputs.items()}
    return [{k: pieces[k][i] for k in inputs} for i in range(n)]


def merge_microbatches(outputs: Sequence[Any]) -> Any:
    """Concatenate per-microbatch outputs along dim 0 (recursing into tuples)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:
            return torch.stack(list(outputs))
        return torch.cat(list(outputs), dim=0)
    if isinstance(first, tuple | list):
        return type(first)(merge_microbatches([o[i] for o in outputs]) for i in range(len(first)))
    return first
