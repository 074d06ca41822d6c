"""Generated token ids -> text deltas that never pass a stop string or split a character."""

from __future__ import annotations

from encoding.stop_scanner import StopScanner
from encoding.tokenizer import DeepSeekV4Tokenizer


class TextStream:
    """Detokenizes one request's completion incrementally and applies its stop strings.

    Text that could still be the start of a stop string is held back (the hold-back is
    `encoding.stop_scanner.StopScanner`, the one the streaming chat parser uses); once a
    stop string completes, the text before it is released and the request stops.
    """

    def __init__(self, tokenizer: DeepSeekV4Tokenizer, stops: tuple[str, ...]) -> None:
        self._detok = tokenizer.detokenizer()
        self._stops = stops
        self._scan = StopScanner()  # decoded text not yet released
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to release."""
        if self.stopped:
            return ""
        self._scan.push(self._detok.feed([token_id]))
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation (not by a stop string): release everything held."""
        if self.stopped:
            return ""
        self._scan.push(self._detok.finish())
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self._stops:
            return self._scan.take_rest()
        hit = self._scan.find(self._stops)
        if hit is not None:
            self.stopped = True
            return self._scan.take(hit[0])
        if final:
            return self._scan.take_rest()
        return self._scan.take(self._scan.safe_end(self._stops))
