"""DeepSeek's four official examples: encoding byte for byte, and parsing the turns back."""

from __future__ import annotations

import json

import pytest

from encoding import encode_messages, parse_message_from_completion_text
from tests.encoding.support import ASSISTANT, EOS, USER, load_vector

MODES = {1: "thinking", 2: "thinking", 3: "thinking", 4: "chat"}


@pytest.mark.parametrize("number", sorted(MODES))
def test_encode_matches_official_output(number: int) -> None:
    messages, expected = load_vector(number)
    assert encode_messages(messages, thinking_mode=MODES[number]) == expected


@pytest.mark.parametrize("number", sorted(MODES))
def test_encode_does_not_modify_the_messages(number: int) -> None:
    messages, _ = load_vector(number)
    before = json.dumps(messages, sort_keys=True)
    encode_messages(messages, thinking_mode=MODES[number])
    assert json.dumps(messages, sort_keys=True) == before


def _completions(prompt: str, marker: str) -> list[str]:
    """Each assistant completion in a prompt: from after ``marker`` through its EOS."""
    out = []
    start = prompt.find(marker)
    while start != -1:
        begin = start + len(marker)
        end = prompt.index(EOS, begin) + len(EOS)
        out.append(prompt[begin:end])
        start = prompt.find(marker, end)
    return out


def test_case_1_parses_tool_call_turn_and_final_turn() -> None:
    _, prompt = load_vector(1)
    first, final = _completions(prompt, ASSISTANT + "<think>")
    tool_turn = parse_message_from_completion_text(first, thinking_mode="thinking")
    assert tool_turn == {
        "role": "assistant",
        "content": "",
        "reasoning_content": ("The user wants to know the weather in Beijing. I should use the get_weather tool."),
        "tool_calls": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": '{"location": "Beijing", "unit": "celsius"}',
                },
            }
        ],
    }
    assert parse_message_from_completion_text(final, thinking_mode="thinking") == {
        "role": "assistant",
        "content": "The weather in Beijing is currently sunny with a temperature of 22°C and 45% humidity.",
        "reasoning_content": "Got the weather data. Let me format a nice response.",
        "tool_calls": [],
    }


def test_case_2_parses_final_turn() -> None:
    _, prompt = load_vector(2)
    assert "The user said hello" not in prompt  # history reasoning was dropped
    final = _completions(prompt, ASSISTANT + "<think>")[-1]
    assert parse_message_from_completion_text(final, thinking_mode="thinking") == {
        "role": "assistant",
        "content": "The capital of France is Paris.",
        "reasoning_content": "The user asks about the capital of France. It is Paris.",
        "tool_calls": [],
    }


def test_case_3_parses_search_call_and_answer() -> None:
    _, prompt = load_vector(3)
    search, answer = _completions(prompt, ASSISTANT + "<think>")
    parsed = parse_message_from_completion_text(search, thinking_mode="thinking")
    assert parsed["reasoning_content"] == "用户想知道小柴胡冲剂和布洛芬能否一起服用。"
    assert parsed["content"] == ""
    assert parsed["tool_calls"] == [
        {
            "type": "function",
            "function": {"name": "search", "arguments": '{"queries": "小柴胡冲剂 布洛芬 相互作用 一起吃"}'},
        }
    ]
    assert parse_message_from_completion_text(answer, thinking_mode="thinking") == {
        "role": "assistant",
        "content": "请及时就医。",
        "reasoning_content": "现在开始组织回答。",
        "tool_calls": [],
    }


def test_case_4_parses_action_answer_in_chat_mode() -> None:
    messages, prompt = load_vector(4)
    final = _completions(prompt, "<\uff5caction\uff5c>")[-1]
    assert final == "Search" + EOS
    assert parse_message_from_completion_text(final, thinking_mode="chat") == {
        "role": "assistant",
        "content": "Search",
        "reasoning_content": "",
        "tool_calls": [],
    }
    first = _completions(prompt, USER + messages[2]["content"] + ASSISTANT + "</think>")[0]
    parsed = parse_message_from_completion_text(first, thinking_mode="chat")
    assert parsed["content"] == messages[3]["content"]
