"""How stage 0 forms groups: their size, their KV reservations, merge padding, and the
prefill message that starts one.

A *group* is one micro-batch of sequences with one KV cache per stage (see :mod:`.engine`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .request import RequestHandle
from .ring_messages import Prefill
from .sampling import encode_rows
from .stage_loop import prompt_cols

__all__ = [
    "Counters",
    "EngineLimits",
    "Group",
    "decoder_tokens",
    "group_size",
    "pad_cost",
    "prefill_message",
]


@dataclass
class Counters:
    """What the scheduler has done so far (``GenerationEngine.counters``)."""

    admitted: int = 0
    finished: int = 0
    tokens: int = 0
    steps: int = 0
    groups_max: int = 0
    merges: int = 0


@dataclass
class EngineLimits:
    """The scheduler's KV budget and batching limits."""

    max_tokens: int = 65536
    """KV budget: sum over admitted rows of ``padded prompt + max_new_tokens``."""
    max_sequences: int = 256
    max_rows_per_group: int = 32
    max_groups: int = 0
    """Groups in flight (0: twice the number of stages)."""
    max_queue: int = 4096


def decoder_tokens(h: RequestHandle) -> int:
    """KV tokens a request adds beyond its prompt (a replayed decoder prefix too)."""
    return len(h.decoder_prefix) + h.params.max_new_tokens


def group_size(pending: int, running: int, groups: int, stages: int, max_rows: int) -> int:
    """Rows for a new group: the waiting requests spread over the stages without a group,
    but never more than an even share of all rows (``running`` + ``pending``) per stage, so a
    burst that arrives while the first group starts does not all land in the second.  Rows left
    over start a group of their own that then merges into the smallest running group."""
    free = max(1, stages - groups)
    share = math.ceil((running + pending) / stages)
    return max(1, min(math.ceil(pending / free), share, max_rows))


@dataclass
class Group:
    gid: int
    rows: list[RequestHandle]
    seq: int
    """Cache length (padded) once the last token returned is appended."""
    reserved: list[int]
    """Each row's KV reservation (:class:`~pipeline_core.kv_budget.KVBudget` tokens)."""
    busy: bool = True
    parked_on: int | None = None
    """Waiting at stage 0 to merge into this (in-flight) group when it comes back."""


def pad_cost(a: Group, b: Group) -> int:
    """KV tokens that left-padding the shorter group adds when ``a`` and ``b`` merge."""
    short = b if b.seq < a.seq else a
    return abs(a.seq - b.seq) * sum(1 for h in short.rows if not h.done)


def prefill_message(
    gid: int, rows: list[RequestHandle], length: int, pad_id: int, enc_dec: bool
) -> Prefill:
    """The message that starts group ``gid``: its prompts padded to ``length`` (see
    :func:`~pipeline_core.stage_loop.prompt_cols`), their sampling rows, a replay's decoder
    prefix, and an empty payload per pass."""
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for r, h in enumerate(rows):
        cols = prompt_cols(enc_dec, len(h.prompt), length)
        ids[r, cols] = torch.tensor(h.prompt)
        mask[r, cols] = 1
    floats, ints = encode_rows([h.params for h in rows], [h.seed for h in rows])
    npass = 2 if enc_dec else 1
    prefix = torch.tensor([h.decoder_prefix for h in rows]) if rows[0].decoder_prefix else None
    return Prefill(gid, ids, mask, floats, ints, prefix, (None,) * npass)
