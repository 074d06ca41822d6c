"""parse_message_from_completion_text: accepted shapes, the official quirks, and errors."""

from __future__ import annotations

import pytest

from encoding import CompletionParseError, encode_messages, parse_message_from_completion_text
from tests.encoding.support import ASSISTANT, BOS, DSML, EOS, assistant, call, dsml_calls, user

OPEN = f"\n\n<{DSML}tool_calls>\n"


def message(content: str = "", reasoning: str = "", calls: list[tuple[str, str]] | None = None) -> dict:
    tool_calls = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls or []]
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": tool_calls}


# -- accepted --------------------------------------------------------------------------------


def test_chat_content() -> None:
    assert parse_message_from_completion_text(f"Hello 世界 😀{EOS}", "chat") == message("Hello 世界 😀")


def test_thinking_reasoning_and_content() -> None:
    assert parse_message_from_completion_text(f"r\n1</think>c{EOS}", "thinking") == message("c", "r\n1")
    assert parse_message_from_completion_text(f"</think>{EOS}", "thinking") == message()


def test_tool_call_values_of_every_kind() -> None:
    params = [
        ("s", "true", 'a "quoted"\nline <b>'),
        ("n", "false", "42"),
        ("o", "false", '{"k": [1, null, 2.5]}'),
        ("u", "true", "日本😀"),
        ("e", "true", ""),
        ("raw", "false", "not json"),  # string="false" values are inserted verbatim
    ]
    text = "r</think>pre" + dsml_calls([("f", params), ("g", [])]) + EOS
    expected_f = (
        '{"s": "a \\"quoted\\"\\nline <b>", "n": 42, "o": {"k": [1, null, 2.5]},'
        ' "u": "日本😀", "e": "", "raw": not json}'
    )
    assert parse_message_from_completion_text(text, "thinking") == message("pre", "r", [("f", expected_f), ("g", "{}")])


# Completions cut inside the tool block that the official parser still accepts.
TRUNCATED = {
    "opener only": (f"\n\n<{DSML}tool_calls", []),
    "after name": (f'{OPEN}<{DSML}invoke name="f">\n', [("f", "{}")]),
    "after parameter": (
        f'{OPEN}<{DSML}invoke name="f">\n<{DSML}parameter name="k" string="true">v</{DSML}parameter>\n',
        [("f", '{"k": "v"}')],
    ),
    "after invoke close": (f'{OPEN}<{DSML}invoke name="f">\n</{DSML}invoke', [("f", "{}")]),
    "no EOS after block": (f'{OPEN}<{DSML}invoke name="f">\n</{DSML}invoke>\n</{DSML}tool_calls>', [("f", "{}")]),
}


@pytest.mark.parametrize(("tail", "calls"), TRUNCATED.values(), ids=TRUNCATED.keys())
def test_completion_cut_inside_the_tool_block_is_accepted_like_the_official_parser(tail: str, calls: list) -> None:
    assert parse_message_from_completion_text("c" + tail, "chat") == message("c", "", calls)


def test_name_line_quirks_follow_the_official_pattern() -> None:
    # "^\\s*name=...>\\n$": leading whitespace is free, and "$" also matches before a last "\n".
    text = f'{OPEN}<{DSML}invoke\tname="f">\n\n</{DSML}invoke>\n</{DSML}tool_calls>{EOS}'
    assert parse_message_from_completion_text(text, "chat") == message("", "", [("f", "{}")])


def test_round_trip_through_the_encoder() -> None:
    args = '{"path": "/tmp/a b.txt", "lines": [1, 2], "opts": {"force": true, "note": "é"}}'
    turn = assistant("I will read it.", reasoning="Need the file.", tool_calls=[call("read", args)])
    prompt = encode_messages([user("q"), turn], "thinking")
    completion = prompt[prompt.rindex(ASSISTANT + "<think>") + len(ASSISTANT + "<think>") :]
    parsed = parse_message_from_completion_text(completion, "thinking")
    assert parsed == message("I will read it.", "Need the file.", [("read", args)])


# -- rejected --------------------------------------------------------------------------------

INVOKE_F = f'<{DSML}invoke name="f">\n'
PARAM_K = f'<{DSML}parameter name="k" string="true">v</{DSML}parameter>\n'
CLOSE = f"</{DSML}invoke>\n</{DSML}tool_calls>"

ERRORS = [
    # (id, text, mode, position of the problem, words in the message)
    ("no </think>", f"abc{EOS}", "thinking", 3 + len(EOS), "</think>"),
    ("calls inside reasoning", f"r{OPEN}{INVOKE_F}{CLOSE}{EOS}", "thinking", 1, "</think>"),
    ("no EOS", "hello", "chat", 5, "end-of-sentence"),
    ("text after EOS", f"a{EOS}b", "chat", 1 + len(EOS), "after"),
    (
        "junk after calls",
        f"{OPEN}{INVOKE_F}{CLOSE}junk{EOS}",
        "chat",
        len(OPEN + INVOKE_F + CLOSE),
        "after the tool calls",
    ),
    ("duplicate parameter", f"{OPEN}{INVOKE_F}{PARAM_K}{PARAM_K}{CLOSE}{EOS}", "chat", None, "duplicate"),
    ("BOS in content", f"a{BOS}b{EOS}", "chat", 1, "special token"),
    ("<think> in content", f"</think>ab<think>{EOS}", "thinking", 10, "special token"),
    ("</think> in chat content", f"ab</think>{EOS}", "chat", 2, "special token"),
    ("EOS in reasoning", f"r{EOS}</think>c{EOS}", "thinking", 1, "special token"),
    ("stray DSML", f"x<{DSML}invoke{EOS}", "chat", 2, "special token"),
    ("bad invoke name", f'{OPEN}<{DSML}invoke nam="f">\n{CLOSE}{EOS}', "chat", None, "invoke name"),
    (
        "bad string flag",
        f'{OPEN}{INVOKE_F}<{DSML}parameter name="k" string="yes">v</{DSML}parameter>\n{CLOSE}{EOS}',
        "chat",
        None,
        "parameter",
    ),
    ("missing newline", f"{OPEN}{INVOKE_F}</{DSML}invoke></{DSML}tool_calls>{EOS}", "chat", None, ">\\n"),
    ("block never closed", f"{OPEN}{INVOKE_F}</{DSML}invoke>\n", "chat", None, "tool_calls"),
    (
        "cut inside parameter",
        f'{OPEN}{INVOKE_F}<{DSML}parameter name="k" string="true">v<',
        "chat",
        None,
        ">\\n",
    ),
]


@pytest.mark.parametrize(("text", "mode", "position", "words"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_malformed_completion(text: str, mode: str, position: int | None, words: str) -> None:
    with pytest.raises(CompletionParseError) as info:
        parse_message_from_completion_text(text, mode)
    assert isinstance(info.value, ValueError)
    assert words in info.value.reason
    if position is not None:
        assert info.value.position == position
    assert f"at character {info.value.position}" in str(info.value)


def test_duplicate_parameter_position_is_the_second_parameter() -> None:
    text = f"{OPEN}{INVOKE_F}{PARAM_K}{PARAM_K}{CLOSE}{EOS}"
    second = text.index(PARAM_K, text.index(PARAM_K) + 1) + len(f"<{DSML}parameter")
    with pytest.raises(CompletionParseError) as info:
        parse_message_from_completion_text(text, "chat")
    assert info.value.position == second


def test_unknown_thinking_mode() -> None:
    with pytest.raises(ValueError, match="thinking_mode"):
        parse_message_from_completion_text(f"x{EOS}", "fast")
