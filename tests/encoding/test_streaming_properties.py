"""StreamingParser == parse_message_from_completion_text, for every way of cutting the text.

Completions are built by hand from random structures (so the expected message is known
without the code under test), then cut at random character indices, at the real
tokenizer's token boundaries (through the incremental detokenizer), or mangled into
malformed text, which must fail the same way in both parsers.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encoding import (
    ArgumentsDelta,
    CompletionParseError,
    DeepSeekV4Tokenizer,
    StreamingParser,
    ToolCall,
    ToolCallStart,
    parse_message_from_completion_text,
)
from tests.encoding.support import BOS, DSML, EOS, collect, dsml_calls, split_at, stream_pieces

FORBIDDEN = (BOS, EOS, "<think>", "</think>", DSML)
# Pieces of markers, so that random text keeps almost-matching them.
NEAR_MISSES = [
    "<",
    ">",
    "/",
    "\n",
    "\n\n",
    "｜",
    "<｜",
    "</",
    "<think",
    "</think",
    "▁",
    "<｜end▁of▁sentence",
    "\n\n<｜DSML",
    "｜DSML",
    "😀",
    "é",
    "世界",
    "\r\n",
    "\t",
    "  ",
]
MARKERS = [
    "</think>",
    "<think>",
    EOS,
    BOS,
    f"\n\n<{DSML}tool_calls",
    f"<{DSML}tool_calls>",
    ">\n",
    f"<{DSML}invoke",
    ' name="f">\n',
    f"<{DSML}parameter",
    ' name="k" string="true">',
    ' string="false">',
    "v<",
    f"/{DSML}parameter",
    f"</{DSML}parameter>",
    f"</{DSML}invoke",
    f"</{DSML}invoke>",
    f"</{DSML}tool_calls>",
    DSML,
    "\n",
    "<",
    '"',
    "x",
    "é",
    "😀",
]

chars = st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd")
raw_text = st.lists(st.one_of(chars, st.sampled_from(NEAR_MISSES)), max_size=24).map("".join)
plain_text = raw_text.filter(lambda s: not any(token in s for token in FORBIDDEN))
no_dsml = raw_text.filter(lambda s: DSML not in s)
names = st.text(st.characters(exclude_categories=("Cs",), exclude_characters='"'), max_size=8).filter(
    lambda s: DSML not in s
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | no_dsml,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(no_dsml, inner, max_size=3),
    max_leaves=6,
)
call_args = st.dictionaries(names, st.one_of(no_dsml, json_values), max_size=4)
calls_st = st.lists(st.tuples(names, call_args), max_size=3)
SETTINGS = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def build(reasoning: str | None, content: str, calls: list[tuple[str, dict[str, Any]]]) -> str:
    """A completion the model could write, from its parts."""
    text = "" if reasoning is None else reasoning + "</think>"
    text += content
    if calls:
        text += dsml_calls([(name, [_param(k, v) for k, v in args.items()]) for name, args in calls])
    return text + EOS


def _param(key: str, value: Any) -> tuple[str, str, str]:
    if isinstance(value, str):
        return key, "true", value
    return key, "false", json.dumps(value, ensure_ascii=False)


def outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except CompletionParseError:
        return "error", CompletionParseError


completions = st.tuples(st.one_of(st.none(), plain_text), plain_text, calls_st)


@SETTINGS
@given(parts=completions, data=st.data())
def test_valid_completion_any_character_split(parts: tuple, data: st.DataObject) -> None:
    reasoning, content, calls = parts
    mode = "chat" if reasoning is None else "thinking"
    text = build(reasoning, content, calls)
    parsed = parse_message_from_completion_text(text, mode)
    # The batch parser against the structure the text was built from.
    assert parsed["reasoning_content"] == (reasoning or "")
    assert parsed["content"] == content
    assert [tc["function"]["name"] for tc in parsed["tool_calls"]] == [name for name, _ in calls]
    assert [json.loads(tc["function"]["arguments"]) for tc in parsed["tool_calls"]] == [a for _, a in calls]
    # The streaming parser against the batch parser.
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    assert stream_pieces(split_at(text, cuts), mode) == parsed
    assert stream_pieces(list(text), mode) == parsed


@SETTINGS
@given(parts=completions, data=st.data())
def test_streamed_arguments_add_up_to_each_call(parts: tuple, data: st.DataObject) -> None:
    """stream_arguments: per call a ToolCallStart (its name), then ArgumentsDelta pieces that
    concatenate to exactly the ToolCall's arguments_json, whatever the cuts; the folded
    message is the one the batch parser returns."""
    reasoning, content, calls = parts
    mode = "chat" if reasoning is None else "thinking"
    text = build(reasoning, content, calls)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    for pieces in (split_at(text, cuts), list(text)):
        parser = StreamingParser(mode, stream_arguments=True)
        events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish()
        assert collect(events) == parse_message_from_completion_text(text, mode)
        starts, streamed, whole = [], [], []
        for event in events:
            if isinstance(event, ToolCallStart):
                starts.append(event.name)
                streamed.append("")
            elif isinstance(event, ArgumentsDelta):
                assert len(streamed) == len(starts) > len(whole), "a piece outside an open call"
                streamed[-1] += event.text
            elif isinstance(event, ToolCall):
                whole.append(event.arguments_json)
                assert len(whole) == len(starts), "a ToolCall without its ToolCallStart"
        assert starts == [name for name, _ in calls]
        assert streamed == whole
        assert [json.loads(s) for s in streamed] == [a for _, a in calls]


@SETTINGS
@given(parts=completions, data=st.data())
def test_valid_completion_split_at_token_boundaries(
    tokenizer: DeepSeekV4Tokenizer, parts: tuple, data: st.DataObject
) -> None:
    reasoning, content, calls = parts
    mode = "chat" if reasoning is None else "thinking"
    text = build(reasoning, content, calls)
    ids = tokenizer.encode(text)
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=len(ids), max_size=len(ids)))
    detok, deltas, start = tokenizer.detokenizer(), [], 0
    for size in sizes:
        deltas.append(detok.feed(ids[start : start + size]))
        start += size
    deltas.append(detok.finish())
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)
    assert stream_pieces(deltas, mode) == parse_message_from_completion_text(text, mode)


@SETTINGS
@given(
    pieces=st.lists(st.one_of(st.sampled_from(MARKERS), raw_text), max_size=16),
    mode=st.sampled_from(["chat", "thinking"]),
    data=st.data(),
)
def test_marker_soup_fails_or_succeeds_the_same_way(pieces: list[str], mode: str, data: st.DataObject) -> None:
    text = "".join(pieces)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10))
    expected = outcome(lambda: parse_message_from_completion_text(text, mode))
    assert outcome(lambda: stream_pieces(split_at(text, cuts), mode)) == expected


@SETTINGS
@given(parts=completions, data=st.data())
def test_mangled_completion_fails_or_succeeds_the_same_way(parts: tuple, data: st.DataObject) -> None:
    reasoning, content, calls = parts
    mode = "chat" if reasoning is None else "thinking"
    text = build(reasoning, content, calls)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(text)))
        if data.draw(st.booleans()):
            text = text[:at] + data.draw(st.sampled_from(MARKERS)) + text[at:]
        else:
            text = text[:at] + text[at + data.draw(st.integers(1, 25)) :]
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10))
    expected = outcome(lambda: parse_message_from_completion_text(text, mode))
    assert outcome(lambda: stream_pieces(split_at(text, cuts), mode)) == expected
    assert outcome(lambda: stream_pieces(list(text), mode)) == expected
