"""The scheduler's KV budget: cache tokens and rows reserved by admitted requests.

Every admitted row reserves ``padded prompt + max_new_tokens`` tokens (and one of
``max_sequences`` rows) until it leaves; a merge that left-pads the shorter group adds its
padding to that row's reservation.  One object holds the sums, so admission, merges, retiring
rows and failures cannot disagree about what is free.
"""

from __future__ import annotations

from .errors import ResourceExhausted

__all__ = ["KVBudget"]


class KVBudget:
    """``max_tokens`` KV tokens and ``max_sequences`` rows, reserved and released by rows."""

    def __init__(self, max_tokens: int, max_sequences: int) -> None:
        if max_tokens <= 0 or max_sequences <= 0:
            raise ValueError(
                f"a KV budget needs max_tokens > 0 and max_sequences > 0, got {max_tokens} "
                f"and {max_sequences}"
            )
        self.max_tokens, self.max_sequences = max_tokens, max_sequences
        self.used_tokens = 0
        self.used_rows = 0

    def fits(self, tokens: int, rows: int = 0) -> bool:
        """Whether ``rows`` more rows holding ``tokens`` more tokens fit now."""
        return (
            self.used_tokens + tokens <= self.max_tokens
            and self.used_rows + rows <= self.max_sequences
        )

    def check_request(self, tokens: int) -> None:
        """Raise :class:`ResourceExhausted` when one request of ``tokens`` could never fit."""
        if tokens > self.max_tokens:
            raise ResourceExhausted(
                f"the request needs {tokens} KV tokens (prompt + max_new_tokens) but the KV "
                f"budget is {self.max_tokens}; ask for fewer tokens"
            )

    def reserve(self, tokens: int, rows: int) -> None:
        """Take ``tokens`` for ``rows`` new rows; :class:`ResourceExhausted` if they do not fit."""
        if not self.fits(tokens, rows):
            raise ResourceExhausted(
                f"{rows} rows of {tokens} KV tokens do not fit: {self.used_tokens} of "
                f"{self.max_tokens} tokens and {self.used_rows} of {self.max_sequences} rows "
                "are in use"
            )
        self.used_tokens += tokens
        self.used_rows += rows

    def grow(self, tokens: int) -> None:
        """Add ``tokens`` to rows already admitted (a merge's left padding, checked with
        :meth:`fits` when the merge was decided; never refused)."""
        self.used_tokens += tokens

    def release(self, tokens: int, rows: int) -> None:
        """Give back ``tokens`` and ``rows`` (rows that left)."""
        if tokens > self.used_tokens or rows > self.used_rows:
            raise RuntimeError(
                f"releasing {tokens} tokens / {rows} rows, but only {self.used_tokens} / "
                f"{self.used_rows} are reserved"
            )
        self.used_tokens -= tokens
        self.used_rows -= rows

    def clear(self) -> None:
        """Every row is gone (the engine failed all of them)."""
        self.used_tokens = self.used_rows = 0
