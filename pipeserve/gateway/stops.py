"""Stop strings matched on the decoded text as it streams, across token boundaries."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopMatcher"]


class StopMatcher:
    """Feed text deltas; get back the text that is safe to show.

    Text that could still be the start of a stop string is held back until the next delta
    decides (a stop string can span several tokens, and several stream messages).  Once a
    stop string appears, the text before it is released and the stop string itself, and
    everything after it, is dropped -- as OpenAI's API does.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = list(stops)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add ``text``; the text that can be shown now (sets :attr:`stopped` on a match)."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        pending = self._held + text
        hits = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return pending[: min(hits)]
        keep = self._partial(pending)
        self._held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        """The text held back when the stream ends without a stop string."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out

    def _partial(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
