"""encode_messages, one branch at a time, against expected strings written by hand.

The expected strings follow docs/model.md §11.3 and the official encoder's behaviour; none is
computed by the code under test.
"""

from __future__ import annotations

import pytest

from encoding import encode_messages
from tests.encoding.support import ASSISTANT as A
from tests.encoding.support import BOS, EOS, REMINDER, assistant, user
from tests.encoding.support import USER as U

TOOLS_TEXT = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

@SCHEMAS@

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""  # noqa: E501

MAX_EFFORT = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve "
    "the root cause, rigorously stress-testing your logic against all potential paths, edge cases, "
    "and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)
RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "weather", "description": "Météo", "parameters": {"type": "object"}},
}
WEATHER_SCHEMA = '{"name": "weather", "description": "Météo", "parameters": {"type": "object"}}'
TOOLS_BLOCK = TOOLS_TEXT.replace("@SCHEMAS@", WEATHER_SCHEMA)


# -- roles and generation prefixes -----------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("chat", f"{BOS}{U}hi{A}</think>"), ("thinking", f"{BOS}{U}hi{A}<think>")],
)
def test_single_user_turn(mode: str, expected: str) -> None:
    assert encode_messages([user("hi")], mode) == expected


def test_system_prompt_has_no_role_token() -> None:
    messages = [{"role": "system", "content": "You are a helpful assistant."}, user("What is 2+2?")]
    expected = f"{BOS}You are a helpful assistant.{U}What is 2+2?{A}<think>"
    assert encode_messages(messages, "thinking") == expected


def test_missing_or_none_content_renders_empty() -> None:
    messages = [{"role": "system", "content": None}, {"role": "user"}]
    assert encode_messages(messages, "chat") == f"{BOS}{U}{A}</think>"


def test_empty_conversation_is_just_bos() -> None:
    assert encode_messages([], "chat") == BOS
    assert encode_messages([], "thinking", add_default_bos_token=False) == ""


def test_no_bos_when_not_asked() -> None:
    assert encode_messages([user("x")], "chat", add_default_bos_token=False) == f"{U}x{A}</think>"


def test_latest_reminder_after_system_and_after_user() -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "latest_reminder", "content": "r"}, user("q")]
    assert encode_messages(messages, "chat") == f"{BOS}s{REMINDER}r{U}q{A}</think>"
    # A reminder counts like an assistant turn for the transition after the user turn.
    after_user = [user("q"), {"role": "latest_reminder", "content": "r"}]
    assert encode_messages(after_user, "chat") == f"{BOS}{U}q{A}</think>{REMINDER}r"


def test_developer_renders_as_user_turn() -> None:
    messages = [{"role": "developer", "content": "find it"}]
    assert encode_messages(messages, "thinking") == f"{BOS}{U}find it{A}<think>"


def test_assistant_without_eos() -> None:
    messages = [user("q"), assistant("partial", wo_eos=True)]
    assert encode_messages(messages, "chat") == f"{BOS}{U}q{A}</think>partial"


# -- reasoning and drop_thinking --------------------------------------------------------

THREE_TURNS = [user("a"), assistant("b", reasoning="r"), user("c")]


def test_history_reasoning_dropped_by_default() -> None:
    assert encode_messages(THREE_TURNS, "thinking") == f"{BOS}{U}a{A}</think>b{EOS}{U}c{A}<think>"


def test_history_reasoning_kept_without_drop() -> None:
    expected = f"{BOS}{U}a{A}<think>r</think>b{EOS}{U}c{A}<think>"
    assert encode_messages(THREE_TURNS, "thinking", drop_thinking=False) == expected


def test_chat_mode_never_thinks() -> None:
    expected = f"{BOS}{U}a{A}</think>b{EOS}{U}c{A}</think>"
    assert encode_messages(THREE_TURNS, "chat") == expected
    assert encode_messages(THREE_TURNS, "chat", drop_thinking=False) == expected


def test_last_assistant_keeps_reasoning_and_closes_think() -> None:
    assert encode_messages([user("a"), assistant("b", reasoning="r")], "thinking") == (
        f"{BOS}{U}a{A}<think>r</think>b{EOS}"
    )
    assert encode_messages([user("a"), assistant("b")], "thinking") == f"{BOS}{U}a{A}<think></think>b{EOS}"


def test_tools_on_system_force_reasoning_to_stay() -> None:
    messages = [{"role": "system", "content": "S", "tools": [WEATHER_TOOL]}, *THREE_TURNS]
    expected = f"{BOS}S\n\n{TOOLS_BLOCK}{U}a{A}<think>r</think>b{EOS}{U}c{A}<think>"
    assert encode_messages(messages, "thinking") == expected


def test_tools_on_any_message_turn_dropping_off_but_only_render_on_system_and_developer() -> None:
    messages = [user("a"), assistant("b", reasoning="r", tools=[WEATHER_TOOL]), user("c")]
    expected = f"{BOS}{U}a{A}<think>r</think>b{EOS}{U}c{A}<think>"
    assert encode_messages(messages, "thinking") == expected


def test_tools_on_a_user_message_are_ignored() -> None:
    # User messages are rebuilt when tool results are merged; only task/wo_eos/mask survive.
    messages = [user("a", tools=[WEATHER_TOOL]), assistant("b", reasoning="r"), user("c")]
    assert encode_messages(messages, "thinking") == f"{BOS}{U}a{A}</think>b{EOS}{U}c{A}<think>"


def test_drop_removes_history_developer_turns() -> None:
    messages = [{"role": "developer", "content": "d"}, assistant("a", reasoning="r"), user("q")]
    assert encode_messages(messages, "thinking") == f"{BOS}a{EOS}{U}q{A}<think>"
    kept = f"{BOS}{U}d{A}<think>r</think>a{EOS}{U}q{A}<think>"
    assert encode_messages(messages, "thinking", drop_thinking=False) == kept


def test_tools_and_response_format_on_developer() -> None:
    rf = {"type": "json_object"}
    messages = [{"role": "developer", "content": "d", "tools": [WEATHER_TOOL], "response_format": rf}]
    expected = f'{BOS}{U}d\n\n{TOOLS_BLOCK}\n\n{RESPONSE_FORMAT}{{"type": "json_object"}}{A}<think>'
    assert encode_messages(messages, "thinking") == expected


def test_response_format_on_system() -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "x", "strict": True}}
    messages = [{"role": "system", "content": "s", "response_format": rf}, user("q")]
    schema = '{"type": "json_schema", "json_schema": {"name": "x", "strict": true}}'
    assert encode_messages(messages, "chat") == f"{BOS}s\n\n{RESPONSE_FORMAT}{schema}{U}q{A}</think>"


def test_several_tool_schemas_one_per_line() -> None:
    other = {"type": "function", "function": {"name": "f", "parameters": {}}}
    messages = [{"role": "system", "content": "", "tools": [WEATHER_TOOL, other]}]
    schemas = WEATHER_SCHEMA + '\n{"name": "f", "parameters": {}}'
    assert encode_messages(messages, "chat") == BOS + "\n\n" + TOOLS_TEXT.replace("@SCHEMAS@", schemas)


# -- reasoning effort --------------------------------------------------------------------


def test_max_effort_prefix_comes_first_in_thinking_mode() -> None:
    messages = [{"role": "system", "content": "s"}, user("q")]
    expected = f"{BOS}{MAX_EFFORT}s{U}q{A}<think>"
    assert encode_messages(messages, "thinking", reasoning_effort="max") == expected
    only_user = encode_messages([user("q")], "thinking", reasoning_effort="max")
    assert only_user == f"{BOS}{MAX_EFFORT}{U}q{A}<think>"


@pytest.mark.parametrize(("mode", "effort"), [("chat", "max"), ("thinking", "high"), ("thinking", None)])
def test_no_effort_prefix_otherwise(mode: str, effort: str | None) -> None:
    think = "<think>" if mode == "thinking" else "</think>"
    assert encode_messages([user("q")], mode, reasoning_effort=effort) == f"{BOS}{U}q{A}{think}"


def test_no_effort_prefix_on_a_continuation() -> None:
    context = [user("a"), assistant("b")]
    out = encode_messages([user("c")], "thinking", context=context, reasoning_effort="max")
    assert out == f"{U}c{A}<think>"
