"""One generation request as its client sees it: a handle that streams tokens, and its result.

The scheduler (:class:`~pipeline_core.engine.GenerationEngine`) pushes tokens and finishes the
handle; the client iterates it, or waits for :meth:`RequestHandle.result`.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import GenerationFailed, RequestError
from .sampling import SamplingParams

__all__ = ["GenerationResult", "RequestHandle", "check_token_ids", "resumed"]


@dataclass
class GenerationResult:
    tokens: list[int]
    finish_reason: str
    """``stop`` (EOS or a stop id), ``length``, ``cancelled``, ``timeout`` or ``error``."""
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class RequestHandle:
    """One request: iterate for tokens as they are produced; :meth:`result` waits for all."""

    def __init__(
        self, rid: int, prompt: list[int], params: SamplingParams, seed: int, wake: Any
    ) -> None:
        self.id, self.prompt, self.params, self.seed = rid, prompt, params, seed
        self.decoder_prefix: list[int] = []
        """An encoder-decoder request's tokens from before a replay (decoder-only: in prompt)."""
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = False
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.deadline = self.submitted + params.timeout_s if params.timeout_s else math.inf
        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        self._done_cond = threading.Condition(lock)
        """Waiters for the end alone (:meth:`result`): not woken by every token, which would
        cost the scheduler's process a thread switch per token (issue 23)."""
        self._wake = wake

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating; the request's KV cache is freed on every stage."""
        self.cancelled = True
        self._wake()

    def _push(self, token: int) -> None:
        with self._cond:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self.tokens.append(token)
            self._cond.notify_all()

    def _finish(self, reason: str, error: str | None = None) -> None:
        with self._cond:
            if self.finish_reason is None:
                self.finish_reason, self.error = reason, error
            self._cond.notify_all()
            self._done_cond.notify_all()

    def __iter__(self) -> Iterator[int]:
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda i=i: len(self.tokens) > i or self.done)
                new, done = self.tokens[i:], self.done  # no token is pushed after finishing
            yield from new
            i += len(new)
            if done:
                if self.error is not None:
                    raise GenerationFailed(self.error)
                return

    def result(self, timeout: float | None = None) -> GenerationResult:
        with self._done_cond:
            if not self._done_cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.id} not finished after {timeout}s")
        assert self.finish_reason is not None
        return GenerationResult(
            list(self.tokens),
            self.finish_reason,
            len(self.prompt) + len(self.decoder_prefix),  # a replay's earlier tokens: input
            len(self.tokens),
            self.error,
        )


def check_token_ids(token_ids: Sequence[int], vocab_size: int, what: str = "prompt") -> list[int]:
    """``token_ids`` as a list of ints in ``[0, vocab_size)``; :class:`RequestError` if not."""
    try:
        ids = [int(t) for t in token_ids]
    except (TypeError, ValueError) as e:
        raise RequestError(f"{what} must be a list of token ids: {e}") from e
    if not ids:
        raise RequestError(f"the {what} is empty; give at least one token")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(
            f"{what}: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})"
        )
    return ids


def resumed(params: SamplingParams, prefix: list[int]) -> SamplingParams:
    """The parameters of a replay that already generated ``prefix``: it continues after
    them, its seeded draws included, as if never interrupted."""
    if len(prefix) >= params.max_new_tokens:
        raise RequestError(
            f"resume_token_ids ({len(prefix)}) already reach max_new_tokens "
            f"({params.max_new_tokens}); nothing is left to generate"
        )
    return dataclasses.replace(
        params,
        max_new_tokens=params.max_new_tokens - len(prefix),
        step_offset=params.step_offset + len(prefix),
    )
