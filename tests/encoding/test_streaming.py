"""StreamingParser: exhaustive splits of the parser's edge cases, hold-back, events, cost."""

from __future__ import annotations

import dataclasses
import time

import pytest

from encoding import (
    CompletionParseError,
    ContentDelta,
    End,
    ReasoningDelta,
    StreamingParser,
    ToolCall,
    parse_message_from_completion_text,
)
from tests.encoding.support import DSML, EOS, dsml_calls, split_at, stream_pieces
from tests.encoding.test_parse import ERRORS, TRUNCATED

VALID = [
    ("thinking", "r<x</think>c\n" + dsml_calls([("f", [("a", "true", "1\n2"), ("b", "false", "[1]")])]) + EOS),
    ("chat", "a\n\nb<｜end▁of▁sent" + EOS),
    ("thinking", "</think>" + dsml_calls([("f", []), ("g", [("k", "true", "")])]) + EOS),
]
EDGE_CASES = (
    VALID + [("chat", "c" + tail) for tail, _ in TRUNCATED.values()] + [(mode, text) for _, text, mode, _, _ in ERRORS]
)


def _outcome(run) -> object:
    try:
        return run()
    except CompletionParseError:
        return CompletionParseError


@pytest.mark.parametrize(("mode", "text"), EDGE_CASES)
def test_every_two_piece_split_and_single_characters(mode: str, text: str) -> None:
    expected = _outcome(lambda: parse_message_from_completion_text(text, mode))
    for cut in range(len(text) + 1):
        assert _outcome(lambda cut=cut: stream_pieces(split_at(text, [cut]), mode)) == expected, cut
    assert _outcome(lambda: stream_pieces(list(text), mode)) == expected


def test_holds_back_only_possible_marker_starts() -> None:
    parser = StreamingParser("chat")
    assert parser.feed("abc\n") == [ContentDelta("abc")]  # "\n" may open a tool block
    assert parser.feed("\n<｜DS") == []
    assert parser.feed("x") == [ContentDelta("\n\n<｜DSx")]
    assert parser.feed("y<") == [ContentDelta("y")]  # "<" may open EOS
    assert parser.feed("b>") == [ContentDelta("<b>")]


def test_reasoning_holds_back_think_close() -> None:
    parser = StreamingParser("thinking")
    assert parser.feed("plan</thi") == [ReasoningDelta("plan")]
    assert parser.feed("nk>ans") == [ContentDelta("ans")]
    assert parser.feed(EOS) == [End()]
    assert parser.finish() == []


def test_tool_call_is_emitted_when_its_invoke_closes() -> None:
    text = dsml_calls([("f", [("k", "true", "v")]), ("g", [])]) + EOS
    first_close = text.index(f"</{DSML}invoke") + len(f"</{DSML}invoke")
    parser = StreamingParser("chat")
    assert parser.feed(text[: first_close - 1]) == []
    assert parser.feed(text[first_close - 1 : first_close]) == [ToolCall("f", '{"k": "v"}')]
    assert parser.feed(text[first_close:]) == [ToolCall("g", "{}"), End()]


def test_malformed_text_raises_as_soon_as_it_is_certain() -> None:
    parser = StreamingParser("chat")
    parser.feed("fine" + EOS)
    with pytest.raises(CompletionParseError, match="after the end-of-sentence"):
        parser.feed("more")
    parser = StreamingParser("chat")
    parser.feed("a<thi")
    with pytest.raises(CompletionParseError) as info:
        parser.feed("nk>")
    assert info.value.position == 1


def test_missing_end_is_reported_at_finish() -> None:
    parser = StreamingParser("thinking")
    assert parser.feed("still thinking") == [ReasoningDelta("still thinking")]
    with pytest.raises(CompletionParseError, match="</think>"):
        parser.finish()


def test_events_are_frozen_and_calls_are_misuse() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ContentDelta("x").text = "y"  # type: ignore[misc]
    parser = StreamingParser("chat")
    parser.feed(EOS)
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")
    with pytest.raises(ValueError, match="thinking_mode"):
        StreamingParser("Chat")


def _stream_seconds(text: str, mode: str) -> float:
    start = time.perf_counter()
    parser = StreamingParser(mode)
    for char in text:
        parser.feed(char)
    parser.finish()
    return time.perf_counter() - start


def _long_completion(n: int) -> str:
    # Long reasoning, content with near-miss markers, and a long parameter value: the three
    # places where a quadratic parser would re-scan its buffer.
    value = ("line <x/> \n" * n)[:n]
    return (
        ("think " * n)[:n] + "</think>" + ("a\n<b " * n)[:n] + dsml_calls([("write", [("text", "true", value)])]) + EOS
    )


def test_cost_is_linear_in_the_text_for_one_character_deltas() -> None:
    small, large = _long_completion(5_000), _long_completion(40_000)
    assert stream_pieces(list(large), "thinking") == parse_message_from_completion_text(large, "thinking")
    _stream_seconds(small, "thinking")  # warm up
    ratio = _stream_seconds(large, "thinking") / _stream_seconds(small, "thinking")
    # 8x the text: about 8x the time when linear, 64x when quadratic.
    assert ratio < 20, ratio
