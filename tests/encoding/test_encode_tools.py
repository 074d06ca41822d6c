"""encode_messages: tool calls, tool results, tasks and continuations, with hand-written expectations."""

from __future__ import annotations

import pytest

from encoding import encode_messages
from tests.encoding.support import ASSISTANT as A
from tests.encoding.support import BOS, EOS, assistant, block, call, invoke, param, tool, user
from tests.encoding.support import USER as U

# -- tool calls -------------------------------------------------------------------------------


def test_arguments_of_every_json_type() -> None:
    arguments = (
        '{"s": "text", "i": 42, "f": 1.5, "t": true, "n": null, "a": [1, "two", null],'
        ' "o": {"k": {"deep": [false]}}, "u": "日本語 😀", "e": "", "big": 12345678901234567890,'
        ' "exp": 1e3, "esc": "\\u00e9\\n", "nested_unicode": {"名": "值"}}'
    )
    messages = [user("q"), assistant(None, tool_calls=[call("f", arguments)])]
    expected_calls = block(
        invoke(
            "f",
            param("s", "true", "text"),
            param("i", "false", "42"),
            param("f", "false", "1.5"),
            param("t", "false", "true"),
            param("n", "false", "null"),
            param("a", "false", '[1, "two", null]'),
            param("o", "false", '{"k": {"deep": [false]}}'),
            param("u", "true", "日本語 😀"),
            param("e", "true", ""),
            param("big", "false", "12345678901234567890"),
            param("exp", "false", "1000.0"),
            param("esc", "true", "é\n"),
            param("nested_unicode", "false", '{"名": "值"}'),
        )
    )
    assert encode_messages(messages, "chat") == f"{BOS}{U}q{A}</think>{expected_calls}{EOS}"


def test_content_reasoning_and_several_calls() -> None:
    calls = [call("a", '{"x": 1}'), call("b", "{}")]
    messages = [user("q"), assistant("let me check", reasoning="plan", tool_calls=calls)]
    expected_calls = block(invoke("a", param("x", "false", "1")), invoke("b", ""))
    assert encode_messages(messages, "thinking") == (
        f"{BOS}{U}q{A}<think>plan</think>let me check{expected_calls}{EOS}"
    )


@pytest.mark.parametrize(
    ("arguments", "rendered"),
    [
        ("not json", param("arguments", "true", "not json")),
        ('{"unclosed": ', param("arguments", "true", '{"unclosed": ')),
        ("", param("arguments", "true", "")),
        ({"x": 1}, param("arguments", "false", '{"x": 1}')),  # a dict is not a JSON string
    ],
)
def test_arguments_that_are_not_a_json_string_become_one_parameter(arguments: object, rendered: str) -> None:
    messages = [user("q"), assistant(None, tool_calls=[call("f", arguments)])]
    assert encode_messages(messages, "chat") == f"{BOS}{U}q{A}</think>{block(invoke('f', rendered))}{EOS}"


def test_empty_tool_calls_list_renders_nothing() -> None:
    messages = [user("q"), assistant("done", tool_calls=[])]
    assert encode_messages(messages, "chat") == f"{BOS}{U}q{A}</think>done{EOS}"


# -- tool results -----------------------------------------------------------------------------

TWO_CALLS = assistant(None, tool_calls=[call("fa", "{}", "a"), call("fb", "{}", "b")])
TWO_CALLS_TEXT = block(invoke("fa", ""), invoke("fb", "")) + EOS


def test_tool_results_follow_call_order_and_merge_with_user_text() -> None:
    messages = [user("q"), TWO_CALLS, tool("rb", "b"), tool("ra", "a"), user("more")]
    expected = (
        f"{BOS}{U}q{A}</think>{TWO_CALLS_TEXT}"
        f"{U}<tool_result>ra</tool_result>\n\n<tool_result>rb</tool_result>\n\nmore{A}</think>"
    )
    assert encode_messages(messages, "chat") == expected


def test_text_blocks_keep_their_slot_while_results_are_sorted() -> None:
    messages = [user("q"), TWO_CALLS, tool("rb", "b"), user("t"), tool("ra", "a")]
    expected = (
        f"{BOS}{U}q{A}</think>{TWO_CALLS_TEXT}"
        f"{U}<tool_result>ra</tool_result>\n\nt\n\n<tool_result>rb</tool_result>{A}</think>"
    )
    assert encode_messages(messages, "chat") == expected


def test_unknown_result_ids_sort_first_and_stably() -> None:
    messages = [user("q"), TWO_CALLS, tool("rb", "b"), tool("rz", "zzz"), tool("ra", "a")]
    results = "\n\n".join(f"<tool_result>{r}</tool_result>" for r in ("rz", "ra", "rb"))
    assert encode_messages(messages, "chat") == f"{BOS}{U}q{A}</think>{TWO_CALLS_TEXT}{U}{results}{A}</think>"


def test_tool_result_content_parts() -> None:
    parts = [{"type": "text", "text": "p1"}, {"type": "image_url"}, {"type": "text", "text": "p2"}]
    messages = [user("q"), assistant(None, tool_calls=[call("f", "{}", "c")]), tool(parts, "c")]
    expected = (
        f"{BOS}{U}q{A}</think>{block(invoke('f', ''))}{EOS}"
        f"{U}<tool_result>p1\n\n[Unsupported image_url]\n\np2</tool_result>{A}</think>"
    )
    assert encode_messages(messages, "chat") == expected


def test_non_string_tool_content_is_rendered_with_str() -> None:
    # The official template formats whatever it gets: None -> "None", a dict -> its repr.
    messages = [tool({"a": 1}), {"role": "tool"}]
    expected = f"{BOS}{U}<tool_result>{{'a': 1}}</tool_result>\n\n<tool_result></tool_result>{A}<think>"
    assert encode_messages(messages, "thinking") == expected


def test_tool_calling_turn_loses_reasoning_when_no_tools_are_declared() -> None:
    messages = [user("q"), assistant(None, reasoning="r", tool_calls=[call("f", "{}", "c")]), tool("x", "c")]
    expected = f"{BOS}{U}q{A}</think>{block(invoke('f', ''))}{EOS}{U}<tool_result>x</tool_result>{A}<think>"
    assert encode_messages(messages, "thinking") == expected


# -- tasks -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "think"), [("chat", "</think>"), ("thinking", "<think>")])
def test_action_task(mode: str, think: str) -> None:
    assert encode_messages([user("q", task="action")], mode) == f"{BOS}{U}q{A}{think}<｜action｜>"


@pytest.mark.parametrize(
    ("task", "token"),
    [
        ("query", "<｜query｜>"),
        ("authority", "<｜authority｜>"),
        ("domain", "<｜domain｜>"),
        ("read_url", "<｜read_url｜>"),
    ],
)
def test_other_tasks_follow_the_user_text(task: str, token: str) -> None:
    assert encode_messages([user("q", task=task)], "thinking") == f"{BOS}{U}q{token}"


def test_answer_after_a_task_has_no_thinking() -> None:
    messages = [user("q", task="action"), assistant("Search", reasoning="ignored")]
    assert encode_messages(messages, "thinking") == f"{BOS}{U}q{A}<think><｜action｜>Search{EOS}"


def test_title_task_on_an_assistant_turn() -> None:
    messages = [user("q"), assistant("a", reasoning="r", task="title"), assistant("T")]
    assert encode_messages(messages, "thinking") == f"{BOS}{U}q{A}<think>r</think>a{EOS}<｜title｜>T{EOS}"


def test_task_turn_does_not_absorb_the_next_user_message() -> None:
    # The task token is only written when the assistant speaks next.
    messages = [user("a", task="query"), user("b")]
    assert encode_messages(messages, "chat") == f"{BOS}{U}a{U}b{A}</think>"


def test_wo_eos_and_mask_survive_the_merge() -> None:
    messages = [user("q", mask=0), assistant("x", wo_eos=True)]
    assert encode_messages(messages, "chat") == f"{BOS}{U}q{A}</think>x"


# -- continuations (context) -------------------------------------------------------------------


def test_continuation_has_no_bos_and_renders_only_new_messages() -> None:
    context = [user("a"), assistant("b", reasoning="r")]
    assert encode_messages([user("c")], "thinking", context=context) == f"{U}c{A}<think>"


def test_continuation_sorts_results_by_the_context_calls() -> None:
    context = [user("q"), TWO_CALLS]
    out = encode_messages([tool("rb", "b"), tool("ra", "a")], "chat", context=context)
    assert out == f"{U}<tool_result>ra</tool_result>\n\n<tool_result>rb</tool_result>{A}</think>"


def test_continuation_results_do_not_join_a_context_tool_turn() -> None:
    # New tool results are not merged into the context's last user turn: they start a new one.
    context = [user("q"), TWO_CALLS, tool("ra", "a")]
    out = encode_messages([tool("rb", "b")], "chat", context=context)
    assert out == f"{U}<tool_result>rb</tool_result>{A}</think>"


@pytest.mark.parametrize("with_tools", [False, True])
def test_context_tools_turn_dropping_off(with_tools: bool) -> None:
    system = {"role": "system", "content": "s"}
    if with_tools:
        system["tools"] = [{"function": {"name": "f"}}]
    context = [system, user("a"), assistant(None, reasoning="r", tool_calls=[call("f", "{}", "c")])]
    messages = [tool("x", "c"), assistant("c2", reasoning="r2"), user("d")]
    history = f"{A}<think>r2</think>c2" if with_tools else f"{A}</think>c2"
    expected = f"{U}<tool_result>x</tool_result>{history}{EOS}{U}d{A}<think>"
    assert encode_messages(messages, "thinking", context=context) == expected


def test_continuation_count_follows_the_official_arithmetic() -> None:
    # Dropping removes the context's developer turn from the full list but not from the
    # context alone, so one fewer new message is rendered: the official encoder's count.
    context = [user("a"), {"role": "developer", "content": "d"}]
    messages = [assistant("b"), user("c")]
    assert encode_messages(messages, "thinking", context=context) == f"{U}c{A}<think>"
    assert encode_messages(messages, "thinking", context=context, drop_thinking=False) == (
        f"</think>b{EOS}{U}c{A}<think>"
    )


def test_tool_calls_on_other_roles_are_checked_but_not_rendered() -> None:
    # The official encoder converts every rendered message's tool_calls (name and arguments
    # must exist) but only prints an assistant's; their arguments are never parsed.
    system = {"role": "system", "content": "s", "tool_calls": [call("f", "[not, json, object]")]}
    assert encode_messages([system, user("q")], "chat") == f"{BOS}s{U}q{A}</think>"
