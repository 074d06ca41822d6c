"""``parse_message_from_completion_text``: one finished completion -> an assistant message.

Accepts exactly what DeepSeek's official parser accepts and returns the same dict (docs/model.md
§11.5). The completion is what the model generated after the prompt's ``<｜Assistant｜>``
prefix: in thinking mode ``reasoning</think>content``, then optionally a DSML tool-call
block, then EOS. Where the official parser asserts, this raises ``CompletionParseError``
with the character position and the reason.

The official parser also accepts a completion cut short inside the tool-call block at a
few places (right after ``<｜DSML｜tool_calls``, after an invoke's name line, after a
parameter's closing line, after ``</｜DSML｜invoke``); those parse to the calls completed
so far. This parser keeps that behaviour so that results agree everywhere.
"""

from __future__ import annotations

from typing import Any

from encoding import tokens as T
from encoding.dsml import INVOKE_NAME_RE, PARAMETER_RE, arguments_json, openai_tool_call
from encoding.errors import CompletionParseError

_PARSE_MODES = ("chat", "thinking")


class _Reader:
    """Reads a text front to back, one "up to the first of these stops" span at a time.

    Remembers where each stop string occurs next, so that looking for a far-away stop over
    and over (``</｜DSML｜invoke`` while reading many parameters) stays linear.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self._next: dict[str, tuple[int, int]] = {}  # stop -> (searched from, found at or -1)

    def _find(self, stop: str) -> int:
        cached = self._next.get(stop)
        if cached is not None and cached[0] <= self.pos and (cached[1] == -1 or cached[1] >= self.pos):
            return cached[1]
        found = self.text.find(stop, self.pos)
        self._next[stop] = (self.pos, found)
        return found

    def read_until(self, *stops: str) -> tuple[str, str | None]:
        """The span up to the earliest stop and that stop; (rest of text, None) if none."""
        best, best_stop = len(self.text), None
        for stop in stops:
            found = self._find(stop)
            if found != -1 and found < best:
                best, best_stop = found, stop
        span = self.text[self.pos : best]
        self.pos = best + len(best_stop) if best_stop is not None else best
        return span, best_stop


def parse_message_from_completion_text(text: str, thinking_mode: str) -> dict[str, Any]:
    """Parse a completion (including its EOS) into an OpenAI-style assistant message.

    Returns ``{"role": "assistant", "content", "reasoning_content", "tool_calls"}`` where
    tool_calls are ``{"type": "function", "function": {"name", "arguments"}}`` and
    ``arguments`` is a JSON object string. Raises ``CompletionParseError`` on malformed text.
    """
    if thinking_mode not in _PARSE_MODES:
        raise ValueError(f"thinking_mode must be one of {_PARSE_MODES}, got {thinking_mode!r}")
    reader = _Reader(text)
    reasoning, reasoning_at = "", 0
    if thinking_mode == "thinking":
        reasoning, stop = reader.read_until(T.THINK_END, T.TOOL_CALLS_OPEN)
        if stop != T.THINK_END:
            raise CompletionParseError(len(reasoning), "reasoning is not closed by </think>")
    content_at = reader.pos
    content, stop = reader.read_until(T.EOS, T.TOOL_CALLS_OPEN)
    tool_calls: list[dict[str, Any]] = []
    if stop == T.TOOL_CALLS_OPEN:
        tool_calls = _parse_tool_calls(reader)
        tail_at = reader.pos
        tail, stop = reader.read_until(T.EOS)
        if tail:
            raise CompletionParseError(tail_at, f"unexpected text after the tool calls: {tail[:40]!r}")
    elif stop is None:
        raise CompletionParseError(len(text), "missing end-of-sentence token")
    if reader.pos != len(text):
        raise CompletionParseError(reader.pos, "text after the end-of-sentence token")
    _check_no_special_tokens(reasoning, reasoning_at, "reasoning")
    _check_no_special_tokens(content, content_at, "content")
    return {
        "role": "assistant",
        "content": content,
        "reasoning_content": reasoning,
        "tool_calls": tool_calls,
    }


def _check_no_special_tokens(span: str, offset: int, what: str) -> None:
    hits = [(span.find(token), token) for token in T.FORBIDDEN_IN_TEXT if token in span]
    if hits:
        at, token = min(hits)
        raise CompletionParseError(offset + at, f"special token {token!r} inside the {what}")


def _expect_gap(reader: _Reader, allowed: tuple[str, ...]) -> str | None:
    """Read the ">\\n" that closes the previous tag and return the stop that follows it."""
    at = reader.pos
    span, stop = reader.read_until(*allowed)
    if span != ">\n":
        raise CompletionParseError(at, f"expected '>\\n' to close a DSML tag, got {span[:40]!r}")
    return stop


def _parse_tool_calls(reader: _Reader) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    # Stops at the end of the text count as a complete (truncated) block, as officially.
    while reader.pos < len(reader.text):
        stop = _expect_gap(reader, (T.INVOKE_OPEN, T.TOOL_CALLS_CLOSE))
        if stop == T.TOOL_CALLS_CLOSE:
            break
        if stop is None:
            raise CompletionParseError(reader.pos, "tool-call block ends without </｜DSML｜tool_calls>")
        calls.append(_parse_invoke(reader))
    return calls


def _parse_invoke(reader: _Reader) -> dict[str, Any]:
    at = reader.pos
    head, stop = reader.read_until(T.PARAM_OPEN, T.INVOKE_CLOSE)
    match = INVOKE_NAME_RE.search(head)
    if match is None:
        raise CompletionParseError(at, f"malformed invoke name: {head[:60]!r}")
    parameters: dict[str, tuple[str, str]] = {}
    while stop == T.PARAM_OPEN:
        at = reader.pos
        body, _ = reader.read_until(T.PARAM_CLOSE)
        param = PARAMETER_RE.search(body)
        if param is None:
            raise CompletionParseError(at, f"malformed parameter: {body[:60]!r}")
        key, flag, value = param.groups()
        if key in parameters:
            raise CompletionParseError(at, f"duplicate parameter {key!r}")
        parameters[key] = (value, flag)
        stop = _expect_gap(reader, (T.PARAM_OPEN, T.INVOKE_CLOSE))
    return openai_tool_call(match.group(1), arguments_json(parameters))
