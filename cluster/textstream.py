"""Generated token ids -> text deltas that never pass a stop string or split a character."""

from __future__ import annotations

from encoding.tokenizer import DeepSeekV4Tokenizer


class TextStream:
    """Detokenizes one request's completion incrementally and applies its stop strings.

    Text that could still be the start of a stop string is held back; once a stop string
    completes, the text before it is released and the request stops.
    """

    def __init__(self, tokenizer: DeepSeekV4Tokenizer, stops: tuple[str, ...]) -> None:
        self._detok = tokenizer.detokenizer()
        self._stops = stops
        self._held = ""  # decoded, not yet released
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to release."""
        if self.stopped:
            return ""
        self._held += self._detok.feed([token_id])
        return self._release()

    def finish(self) -> str:
        """End of generation (not by a stop string): release everything held."""
        if self.stopped:
            return ""
        self._held += self._detok.finish()
        hit = self._first_stop()
        if hit is not None:
            self.stopped = True
            return self._held[:hit]
        text, self._held = self._held, ""
        return text

    def _first_stop(self) -> int | None:
        hits = [i for i in (self._held.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _release(self) -> str:
        if not self._stops:
            text, self._held = self._held, ""
            return text
        hit = self._first_stop()
        if hit is not None:
            self.stopped = True
            text, self._held = self._held[:hit], ""
            return text
        keep = self._partial_stop_len()
        cut = len(self._held) - keep
        text, self._held = self._held[:cut], self._held[cut:]
        return text

    def _partial_stop_len(self) -> int:
        """Length of the longest suffix of the held text that starts some stop string."""
        longest = max(len(s) for s in self._stops)
        for n in range(min(longest - 1, len(self._held)), 0, -1):
            tail = self._held[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
