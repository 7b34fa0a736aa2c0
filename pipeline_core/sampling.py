"""Decoding parameters, their validation, and token choice on the last stage.

Greedy decoding is ``argmax`` of the float32 logits, exactly as ``transformers`` ``generate``
does.  Otherwise the model's own rules and the repetition penalty apply first
(:mod:`.logits_rules`), then, in ``generate``'s order, temperature, top-k and top-p; token ``k``
of a request is drawn with a generator seeded from (request seed, ``k``), so a request's tokens
do not depend on what else is in its batch, and a replay from token ``k`` (after a lost worker)
continues exactly.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import PlanError, RequestError, ResourceExhausted
from .logits_rules import LogitsRules

__all__ = [
    "FLOAT_COLUMNS",
    "INT_COLUMNS",
    "RequestError",
    "ResourceExhausted",
    "Sampler",
    "SamplingParams",
    "context_length",
    "decode_rows",
    "encode_rows",
]


@dataclass
class SamplingParams:
    """How one request decodes.  ``temperature == 0`` means greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p, in (0, 1]."""
    repetition_penalty: float = 1.0
    seed: int | None = None
    """Sampling seed; the same seed gives the same tokens (None: a random one)."""
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    timeout_s: float | None = None
    step_offset: int = 0
    """Tokens this request generated before (a replay after a lost worker continues its
    random stream from there: each token's draw depends only on the seed and its index)."""

    def validate(self, prompt_len: int, context: int | None) -> None:
        if self.max_new_tokens <= 0:
            raise RequestError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if context is not None and prompt_len + self.max_new_tokens > context:
            raise RequestError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({self.max_new_tokens}) "
                f"exceeds the model's context of {context} tokens; shorten the prompt or ask "
                "for fewer tokens"
            )
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise RequestError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not self.temperature >= 0:
            raise RequestError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise RequestError(
                f"repetition_penalty must be > 0 (1: none), got {self.repetition_penalty}"
            )
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise RequestError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise RequestError(f"timeout_s must be > 0, got {self.timeout_s}")

    def resolved_seed(self) -> int:
        return self.seed if self.seed is not None else random.getrandbits(62)


FLOAT_COLUMNS = ("temperature", "top_p", "repetition_penalty")
"""The float64 sampling columns of a prefill (:func:`encode_rows`), in order."""
INT_COLUMNS = ("top_k", "seed", "step_offset", "max_new_tokens")
"""The int64 sampling columns of a prefill, in order (a uint64 seed travels as the int64 of
the same bits)."""


def encode_rows(params: list[SamplingParams], seeds: list[int]) -> tuple[torch.Tensor, ...]:
    """Per-row parameters as two small tensors (they travel to the last stage): one row per
    request, columns :data:`FLOAT_COLUMNS` and :data:`INT_COLUMNS`."""
    f = torch.tensor([[getattr(p, c) for c in FLOAT_COLUMNS] for p in params], dtype=torch.float64)
    rows = []
    for p, s in zip(params, seeds, strict=True):
        values = {"seed": s - 2**64 if s >= 2**63 else s}
        rows.append([values[c] if c in values else getattr(p, c) for c in INT_COLUMNS])
    return f, torch.tensor(rows, dtype=torch.int64)


def decode_rows(floats: torch.Tensor, ints: torch.Tensor) -> dict[str, list[Any]]:
    """The columns of :func:`encode_rows` by name, one value per row (seeds as uint64)."""
    cols: dict[str, list[Any]] = {c: floats[:, k].tolist() for k, c in enumerate(FLOAT_COLUMNS)}
    cols.update({c: ints[:, k].tolist() for k, c in enumerate(INT_COLUMNS)})
    cols["seed"] = [s % 2**64 for s in cols["seed"]]
    return cols


def _step_seed(seed: int, step: int) -> int:
    """The seed of token ``step``'s draw: a request's tokens are reproducible one by one, so a
    replay from any point continues exactly."""
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9) % (2**63)


class Sampler:
    """Token choice for one group's rows on the last stage.

    ``own``: each row's history length (prompt, or decoder start, without padding) at the first
    choice; ``rules`` builds each row's processors (None: no model rules, no penalty) from it
    and the row's prompt (``encoder_ids``)."""

    def __init__(
        self,
        floats: torch.Tensor,
        ints: torch.Tensor,
        own: list[int],
        rules: LogitsRules,
        encoder_ids: list[list[int]],
    ) -> None:
        cols = decode_rows(floats, ints)
        self.temperature = cols["temperature"]
        self.top_p = cols["top_p"]
        self.top_k = cols["top_k"]
        self.seeds = cols["seed"]
        self.steps = cols["step_offset"]
        self.own = list(own)
        self.procs: list[Any] = [
            rules.for_request(n, n - off, new, pen, e)
            for n, off, new, pen, e in zip(
                self.own,
                self.steps,
                cols["max_new_tokens"],
                cols["repetition_penalty"],
                encoder_ids,
                strict=True,
            )
        ]
        self._gen = torch.Generator()

    _ROWS = ("temperature", "top_p", "top_k", "seeds", "steps", "own", "procs")

    def select(self, keep: list[int]) -> None:
        for name in self._ROWS:
            v = getattr(self, name)
            setattr(self, name, [v[i] for i in keep])

    def extend(self, other: Sampler) -> None:
        """Append another group's rows (groups merge)."""
        for name in self._ROWS:
            getattr(self, name).extend(getattr(other, name))

    def choose(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Next token per row from float32 ``logits`` ``[rows, vocab]``; ``ids`` is the
        left-padded history (each row's own last ``own`` tokens feed its processors)."""
        if len(self.top_k) != logits.shape[0]:
            raise PlanError(f"sampler has {len(self.top_k)} rows, logits {logits.shape[0]}")
        self.steps = [k + 1 for k in self.steps]  # the draw of token k uses step k
        own, self.own = self.own, [n + 1 for n in self.own]
        if all(t == 0 for t in self.temperature) and all(p is None for p in self.procs):
            return _argmax(logits)
        out = []
        ids, logits = ids.cpu(), logits.float().cpu()  # one copy each for all rows
        for r in range(logits.shape[0]):
            hist = ids[r : r + 1, ids.shape[1] - own[r] :]
            out.append(self._one(r, hist, logits[r : r + 1]))
        return torch.tensor(out, dtype=torch.long)

    def _one(self, r: int, ids: torch.Tensor, scores: torch.Tensor) -> int:
        from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

        if self.procs[r] is not None:
            scores = self.procs[r](ids, scores)
        if self.temperature[r] == 0:
            return int(_argmax(scores))
        scores = scores / self.temperature[r]
        if self.top_k[r] > 0:
            scores = TopKLogitsWarper(self.top_k[r])(ids, scores)
        if self.top_p[r] < 1:
            scores = TopPLogitsWarper(self.top_p[r])(ids, scores)
        probs = torch.softmax(scores, dim=-1)
        self._gen.manual_seed(_step_seed(int(self.seeds[r]), self.steps[r] - 1))
        return int(torch.multinomial(probs, 1, generator=self._gen))


def _argmax(scores: torch.Tensor) -> torch.Tensor:
    """Each row's first maximal index, as ``torch.argmax`` (which ``generate`` uses) gives it:
    numpy's for float32 on the CPU -- one thread takes ~130 us for a 32000-token row with
    torch's kernel and ~30 us with numpy's, on the last stage's token path (issue 23)."""
    if scores.device.type == "cpu" and scores.dtype == torch.float32:
        return torch.from_numpy(scores.detach().numpy().argmax(axis=-1))
    return torch.argmax(scores, dim=-1).cpu()


def context_length(config: Any) -> int | None:
    """The model's longest sequence (None: no fixed limit, e.g. T5's relative positions)."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None
