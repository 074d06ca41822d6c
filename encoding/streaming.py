"""Streaming parser: completion text arriving in pieces -> reasoning / content / tool calls.

For any split of a completion into deltas, the events add up to exactly what
``parse_message_from_completion_text`` returns for the whole text, and malformed text
raises the same ``CompletionParseError`` (possibly earlier, as soon as it is certain).

Reasoning and content stream out as soon as a character cannot be the start of a marker
(``</think>``, ``\\n\\n<｜DSML｜tool_calls``, the EOS text); a tool call is emitted whole
when its ``</｜DSML｜invoke`` arrives. With ``stream_arguments`` a call is also told as it is
written: ``ToolCallStart`` once its name is read, then ``ArgumentsDelta`` pieces of its
arguments' JSON text (they add up to the ``ToolCall``'s ``arguments_json``, which still
follows). Work per delta is proportional to the delta plus a marker's length: nothing is
re-scanned.

States follow the official parser's reads (see ``encoding.parse``)::

    reasoning --</think>--> content --EOS--> done
                              |
                   \\n\\n<｜DSML｜tool_calls
                              v
    calls --<｜DSML｜invoke--> invoke --<｜DSML｜parameter--> param --/｜DSML｜parameter--> param_gap
      ^  \\--</｜DSML｜tool_calls>--> after_calls --EOS--> done          |
      \\--------------------------</｜DSML｜invoke-----------------------/
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from encoding import tokens as T
from encoding.dsml import INVOKE_NAME_RE, PARAMETER_RE, arguments_json, to_json
from encoding.errors import CompletionParseError
from encoding.stop_scanner import StopScanner


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str  # the next piece of reasoning_content


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str  # the next piece of content


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str  # the function name
    arguments_json: str  # a JSON object string, as in the parsed message's "arguments"


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    name: str  # a call's function name, read before its arguments (stream_arguments)


@dataclass(frozen=True, slots=True)
class ArgumentsDelta:
    text: str  # the next piece of the open call's arguments JSON (stream_arguments)


@dataclass(frozen=True, slots=True)
class End:
    """The completion is over (EOS seen, or finish() on a completion the parser accepts)."""


Event = ReasoningDelta | ContentDelta | ToolCall | ToolCallStart | ArgumentsDelta | End

_STOPS: dict[str, tuple[str, ...]] = {
    "reasoning": (T.THINK_END, T.TOOL_CALLS_OPEN),
    "content": (T.EOS, T.TOOL_CALLS_OPEN),
    "calls": (T.INVOKE_OPEN, T.TOOL_CALLS_CLOSE),
    "invoke": (T.PARAM_OPEN, T.INVOKE_CLOSE),
    "param": (T.PARAM_CLOSE,),
    "param_gap": (T.PARAM_OPEN, T.INVOKE_CLOSE),
    "after_calls": (T.EOS,),
    "done": (),
}
_EMITTING = {"reasoning": ReasoningDelta, "content": ContentDelta}
_LONGEST_FORBIDDEN = max(len(token) for token in T.FORBIDDEN_IN_TEXT)
_PARAM_HEAD = re.compile(r' name="(.*?)" string="(true|false)">', re.DOTALL)  # a parameter's value follows


class StreamingParser:
    """Incremental ``parse_message_from_completion_text``: ``feed(delta)``..., ``finish()``."""

    def __init__(self, thinking_mode: str, stream_arguments: bool = False) -> None:
        if thinking_mode not in ("chat", "thinking"):
            raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
        self._scan = StopScanner()
        self._state = "reasoning" if thinking_mode == "thinking" else "content"
        self._span_start = 0  # absolute offset where the current state's span begins
        self._pending: list[str] = []  # buffered span of a non-emitting state
        self._recent = ""  # last characters emitted in the current field (marker check)
        self._tool_name = ""
        self._parameters: dict[str, tuple[str, str]] = {}
        self._ended = False
        self._finished = False
        self._accounted = 0  # absolute offset: the text before it is told by the events so far
        self._stream_args = stream_arguments
        self._value_sent = 0  # characters of the open parameter's value sent as ArgumentsDelta
        self._value_flag: str | None = None  # the open parameter's string flag, once its head is read

    @property
    def accounted(self) -> int:
        """Characters of the completion that the events emitted so far stand for (their text,
        the markers between them, whole tool calls); what a reader who got only the events
        has not seen starts here (the text of an unfinished tool-call block included)."""
        return self._accounted

    def feed(self, delta: str) -> list[Event]:
        """Consume the next piece of generated text; return the events it completes."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._scan.push(delta)
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[Event]:
        """The stream is over: flush what was held back and check the completion is whole."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        events: list[Event] = []
        state = self._state
        span_start = self._scan.offset if state in _EMITTING else self._span_start
        span = self._scan.take_rest()
        if state in _EMITTING:
            self._emit(span, events)
        else:
            span = "".join(self._pending) + span
        self._on_end_of_text(state, span, span_start, events)
        if not self._ended:
            events.append(End())
            self._ended = True
        return events

    # -- one marker at a time -------------------------------------------------------

    def _step(self, events: list[Event]) -> bool:
        """Handle the next complete marker; False when more text is needed."""
        if self._state == "done":
            self._check_done()
            return False
        stops = _STOPS[self._state]
        found = self._scan.find(stops)
        if found is None:
            text = self._scan.take(self._scan.safe_end(stops))
            if self._state in _EMITTING:
                self._emit(text, events)
            elif text:
                self._pending.append(text)
                if self._state == "param" and self._stream_args:
                    self._stream_value(events)
            return False
        index, stop = found
        span = self._scan.take(index)
        if self._state in _EMITTING:
            self._emit(span, events)
            span_start = self._scan.offset - len(span)
        else:
            span = "".join(self._pending) + span
            self._pending.clear()
            span_start = self._span_start
        self._scan.skip(len(stop))
        self._span_start = self._scan.offset
        self._on_stop(span, stop, span_start, events)
        return True

    def _check_done(self) -> None:
        leftover = self._scan.take_rest()
        if leftover:
            at = self._scan.offset - len(leftover)
            raise CompletionParseError(at, "text after the end-of-sentence token")

    def _emit(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        # A special token may straddle two emitted pieces: check with the previous tail.
        window = self._recent + text
        for token in T.FORBIDDEN_IN_TEXT:
            at = window.find(token)
            if at != -1:
                where = self._scan.offset - len(window) + at
                raise CompletionParseError(where, f"special token {token!r} inside the {self._state}")
        self._recent = window[-(_LONGEST_FORBIDDEN - 1) :]
        events.append(_EMITTING[self._state](text))
        self._accounted = self._scan.offset

    def _enter(self, state: str) -> None:
        self._state = state
        self._recent = ""

    # -- what each marker means, mirroring the official parser ----------------------

    def _on_stop(self, span: str, stop: str, span_start: int, events: list[Event]) -> None:
        state = self._state
        if state == "reasoning":
            if stop != T.THINK_END:
                raise CompletionParseError(span_start + len(span), "reasoning is not closed by </think>")
            self._enter("content")
            self._accounted = self._scan.offset
        elif state == "content":
            self._enter("calls" if stop == T.TOOL_CALLS_OPEN else "done")
            if stop == T.EOS:
                self._accounted = self._scan.offset
        elif state == "calls":
            self._expect_gap(span, span_start)
            self._enter("invoke" if stop == T.INVOKE_OPEN else "after_calls")
        elif state == "invoke":
            self._start_invoke(span, span_start, events)
            self._after_parameter(stop, events)
        elif state == "param":
            self._add_parameter(span, span_start, events)
            self._enter("param_gap")
        elif state == "param_gap":
            self._expect_gap(span, span_start)
            self._after_parameter(stop, events)
        elif state == "after_calls":
            self._expect_empty_tail(span, span_start)
            self._enter("done")
        if self._state == "done" and not self._ended:
            events.append(End())
            self._ended = True

    def _on_end_of_text(self, state: str, span: str, span_start: int, events: list[Event]) -> None:
        """The text ended inside ``state`` with ``span`` unread: accept or reject as officially."""
        if state == "reasoning":
            raise CompletionParseError(span_start + len(span), "reasoning is not closed by </think>")
        if state == "content":
            raise CompletionParseError(span_start + len(span), "missing end-of-sentence token")
        if state == "calls" and span:
            self._expect_gap(span, span_start)
            at = span_start + len(span)
            raise CompletionParseError(at, "tool-call block ends without </｜DSML｜tool_calls>")
        if state == "invoke":
            self._start_invoke(span, span_start, events)
            self._finish_invoke(events)
        elif state == "param":
            self._add_parameter(span, span_start, events)
            self._expect_gap("", span_start + len(span))
        elif state == "param_gap":
            self._expect_gap(span, span_start)
            self._finish_invoke(events)
        elif state == "after_calls":
            self._expect_empty_tail(span, span_start)
        elif state == "done" and span:
            raise CompletionParseError(span_start, "text after the end-of-sentence token")

    def _expect_gap(self, span: str, span_start: int) -> None:
        if span != ">\n":
            raise CompletionParseError(span_start, f"expected '>\\n' to close a DSML tag, got {span[:40]!r}")

    def _expect_empty_tail(self, span: str, span_start: int) -> None:
        if span:
            raise CompletionParseError(span_start, f"unexpected text after the tool calls: {span[:40]!r}")

    def _start_invoke(self, head: str, span_start: int, events: list[Event]) -> None:
        match = INVOKE_NAME_RE.search(head)
        if match is None:
            raise CompletionParseError(span_start, f"malformed invoke name: {head[:60]!r}")
        self._tool_name = match.group(1)
        self._parameters = {}
        if self._stream_args:
            events += [ToolCallStart(self._tool_name), ArgumentsDelta("{")]

    def _add_parameter(self, body: str, span_start: int, events: list[Event]) -> None:
        match = PARAMETER_RE.search(body)
        if match is None:
            raise CompletionParseError(span_start, f"malformed parameter: {body[:60]!r}")
        key, flag, value = match.groups()
        if key in self._parameters:
            raise CompletionParseError(span_start, f"duplicate parameter {key!r}")
        if self._stream_args:  # the rest of the value, and the parameter's end
            if self._value_flag is None:
                events.append(ArgumentsDelta(self._key_json(key, flag)))
            events.append(ArgumentsDelta(self._value_json(value[self._value_sent :], flag) + ('"' * (flag == "true"))))
            self._value_sent, self._value_flag = 0, None
        self._parameters[key] = (value, flag)

    def _stream_value(self, events: list[Event]) -> None:
        """Send what is certain of the open parameter's value: all read but a trailing "<"
        (it may begin the closing tag). The head goes first, once it is complete."""
        body = "".join(self._pending)
        head = _PARAM_HEAD.match(body)
        if head is None:
            return
        if self._value_flag is None:
            key, self._value_flag = head.group(1), head.group(2)
            events.append(ArgumentsDelta(self._key_json(key, self._value_flag)))
        value = body[head.end() :]
        certain = len(value) - value.endswith("<")
        if certain > self._value_sent:
            events.append(ArgumentsDelta(self._value_json(value[self._value_sent : certain], self._value_flag)))
            self._value_sent = certain

    def _key_json(self, key: str, flag: str) -> str:
        return (", " if self._parameters else "") + to_json(key) + ": " + ('"' * (flag == "true"))

    @staticmethod
    def _value_json(piece: str, flag: str) -> str:
        return to_json(piece)[1:-1] if flag == "true" else piece

    def _after_parameter(self, stop: str, events: list[Event]) -> None:
        if stop == T.PARAM_OPEN:
            self._enter("param")
        else:
            self._finish_invoke(events)
            self._enter("calls")

    def _finish_invoke(self, events: list[Event]) -> None:
        if self._stream_args:
            events.append(ArgumentsDelta("}"))
        events.append(ToolCall(self._tool_name, arguments_json(self._parameters)))
        self._accounted = self._scan.offset
