"""Input the official encoder rejects raises EncodingError (a ValueError) naming the message."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from encoding import EncodingError, encode_messages
from tests.encoding.support import assistant, call, tool, user

CASES: list[tuple[str, list[Any], str, str]] = [
    # (case id, messages, expected location, expected words)
    ("not a dict", [user("a"), "oops"], "messages[1]", "dict"),
    ("unhashable role", [{"role": ["user"], "content": "x"}], "messages[0]", "role"),
    ("unknown role", [user("a"), {"role": "narrator", "content": "x"}], "messages[1]", "unknown role"),
    (
        "empty developer",
        [user("a"), assistant("b"), {"role": "developer", "content": ""}],
        "messages[2]",
        "developer",
    ),
    (
        "developer list content",
        [{"role": "developer", "content": [{"type": "text"}]}],
        "messages[0]",
        "string",
    ),
    ("user content None", [user(None)], "messages[0]", "string"),
    ("user content parts", [user([{"type": "text", "text": "x"}])], "messages[0]", "string"),
    (
        "tool call without function",
        [user("q"), assistant(None, tool_calls=[{"id": "x"}])],
        "messages[1]",
        "function",
    ),
    (
        "arguments JSON array",
        [user("q"), assistant(None, tool_calls=[call("f", "[1, 2]")])],
        "messages[1]",
        "object",
    ),
    (
        "arguments JSON null",
        [user("q"), assistant(None, tool_calls=[call("f", "null")])],
        "messages[1]",
        "object",
    ),
    (
        "arguments not serializable",
        [user("q"), assistant(None, tool_calls=[call("f", {1, 2})])],
        "messages[1]",
        "JSON",
    ),
    ("tool calls not a list", [user("q"), assistant(None, tool_calls=5)], "messages[1]", "list"),
    (
        "tool without function",
        [{"role": "system", "content": "s", "tools": [{"name": "f"}]}],
        "messages[0]",
        "function",
    ),
    (
        "response_format not JSON",
        [{"role": "system", "content": "", "response_format": {"x": {1}}}],
        "messages[0]",
        "JSON",
    ),
    (
        "tool calls on system without function",
        [{"role": "system", "content": "s", "tool_calls": [{"id": "x"}]}],
        "messages[0]",
        "function",
    ),
    ("invalid task", [user("q", task="summarize")], "messages[0]", "task"),
    ("tool content part not a dict", [user("q"), tool("ok", "a"), tool(["bad"], "b")], "messages[2]", "dict"),
    ("tool content text not a string", [tool([{"type": "text", "text": 3}])], "messages[0]", "string"),
]


@pytest.mark.parametrize(("messages", "where", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rejected_with_location_and_reason(messages: list[Any], where: str, words: str) -> None:
    with pytest.raises(EncodingError) as info:
        encode_messages(messages, "thinking")
    assert where in str(info.value)
    assert words.lower() in str(info.value).lower()
    assert isinstance(info.value, ValueError)


def test_errors_in_context_name_the_context() -> None:
    with pytest.raises(EncodingError, match=r"context\[1\]"):
        encode_messages([user("x")], "chat", context=[user("a"), 7])


def test_malformed_tool_call_ids_in_context_are_rejected() -> None:
    with pytest.raises(EncodingError, match=r"context\[1\]"):
        encode_messages([user("x")], "chat", context=[user("a"), assistant(None, tool_calls=["x"])])


@pytest.mark.parametrize("mode", ["Thinking", "", None])
def test_bad_thinking_mode(mode: Any) -> None:
    with pytest.raises(EncodingError, match="thinking_mode"):
        encode_messages([user("a")], mode)


@pytest.mark.parametrize("effort", ["low", "medium", "MAX", 1])
def test_bad_reasoning_effort(effort: Any) -> None:
    with pytest.raises(EncodingError, match="reasoning_effort"):
        encode_messages([user("a")], "thinking", reasoning_effort=effort)


def test_messages_must_be_a_list() -> None:
    with pytest.raises(EncodingError, match="list"):
        encode_messages({"role": "user", "content": "x"}, "chat")  # type: ignore[arg-type]


def test_an_invalid_task_is_only_checked_where_its_token_is_written() -> None:
    # Followed by another user turn, the task writes nothing, and the official encoder
    # accepts it; so does this one.
    assert encode_messages([user("a", task="bogus"), user("b")], "chat").endswith("<｜User｜>b<｜Assistant｜></think>")


def test_errors_survive_python_dash_o() -> None:
    """The checks are not asserts: they still fire when Python strips assertions."""
    code = (
        "from encoding import encode_messages, parse_message_from_completion_text\n"
        "for fn in (lambda: encode_messages([{'role': 'developer', 'content': ''}], 'chat'),\n"
        "           lambda: parse_message_from_completion_text('no end', 'thinking')):\n"
        "    try:\n"
        "        fn()\n"
        "    except ValueError:\n"
        "        continue\n"
        "    raise SystemExit('accepted invalid input under -O')\n"
    )
    result = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout
