"""Streaming text from token ids, a few tokens of work per step.

Decoding the whole output again for every streamed chunk costs O(n) per token (O(n^2) for a
long answer), and a byte-level tokenizer can end a decode in the middle of a UTF-8 character
(``"\\ufffd"``), which a delta already sent could not take back.  :class:`Detokenizer` keeps two
offsets (the scheme of Hugging Face's text-generation-inference): it decodes only from a
window start a token or two back -- so a tokenizer that decides spacing from context sees that
context -- and holds text back while it ends in a replacement character.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["Detokenizer"]

_PARTIAL = "\ufffd"


class Detokenizer:
    """Turn a stream of token ids into text deltas whose concatenation (with :meth:`flush`)
    equals ``tokenizer.decode(all ids, skip_special_tokens=True)`` for tokenizers whose
    decoding is prefix-stable (byte-level BPE, SentencePiece, word-level)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start: context for the tokenizer, already sent
        self._read = 0  # ids up to here are sent as text

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def push(self, ids: Sequence[int]) -> str:
        """Add ``ids``; the text they complete (may be empty while a character is partial)."""
        self.ids.extend(ids)
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        if len(now) > len(before) and not now.endswith(_PARTIAL):
            self._prefix, self._read = self._read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """The text held back at the end (e.g. a character cut off by ``max_new_tokens``)."""
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return now[len(before) :]
