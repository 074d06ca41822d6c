"""A growing text read in "up to the first of these stop strings" spans, in linear time.

The streaming parser needs to know, after each delta, whether a stop string (a marker such
as ``</think>``) has appeared, and which characters are certainly not part of one. The
scanner keeps only the unread tail of the text (the held-back prefix of a marker plus the
newest delta), so each character is searched a bounded number of times however the text
is split.
"""

from __future__ import annotations


class StopScanner:
    """The unread part of a stream, with marker search and hold-back."""

    def __init__(self) -> None:
        self._window = ""  # unread text starts at _window[_pos]
        self._pos = 0
        self._base = 0  # absolute offset of _window[0] in the whole stream
        self._next: dict[str, tuple[int, int]] = {}  # stop -> (searched from, found at or -1)

    @property
    def offset(self) -> int:
        """Absolute position (in characters) of the first unread character."""
        return self._base + self._pos

    def push(self, delta: str) -> None:
        """Append newly generated text."""
        if not delta:
            return
        # Drop what has been read; what is left is short (a held-back marker prefix).
        self._base += self._pos
        self._window = self._window[self._pos :] + delta
        self._pos = 0
        self._next.clear()

    def find(self, stops: tuple[str, ...]) -> tuple[int, str] | None:
        """(window index, stop) of the earliest complete stop in the unread text, or None."""
        best: tuple[int, str] | None = None
        for stop in stops:
            found = self._find_one(stop)
            if found != -1 and (best is None or found < best[0]):
                best = (found, stop)
        return best

    def _find_one(self, stop: str) -> int:
        cached = self._next.get(stop)
        if cached is not None and cached[0] <= self._pos and (cached[1] == -1 or cached[1] >= self._pos):
            return cached[1]
        found = self._window.find(stop, self._pos)
        self._next[stop] = (self._pos, found)
        return found

    def safe_end(self, stops: tuple[str, ...]) -> int:
        """Window index up to which no stop can start, given that none is complete yet.

        Everything before it can be released; the rest might still become a stop.
        """
        window, end = self._window, len(self._window)
        safe = end
        for stop in stops:
            # Only the last len(stop) - 1 characters can hold an unfinished stop.
            start = window.find(stop[0], max(self._pos, end - len(stop) + 1))
            while start != -1 and start < safe:
                if stop.startswith(window[start:]):
                    safe = start
                    break
                start = window.find(stop[0], start + 1)
        return safe

    def take(self, end: int) -> str:
        """Read up to window index ``end``."""
        text = self._window[self._pos : end]
        self._pos = end
        return text

    def skip(self, count: int) -> None:
        """Read past ``count`` characters (a stop that was found)."""
        self._pos += count

    def take_rest(self) -> str:
        """Read everything left."""
        return self.take(len(self._window))
