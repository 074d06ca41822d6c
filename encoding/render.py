"""``encode_messages``: an OpenAI-style conversation -> the DeepSeek-V4 prompt string.

Byte-for-byte compatible with DeepSeek's official ``encoding_dsv4.py`` (docs/model.md §11.3).
Where the official encoder fails (assertion, KeyError, TypeError, ...) this raises
``EncodingError`` naming the message and the reason instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from encoding import conversation
from encoding import tokens as T
from encoding.conversation import Turn, last_user_index, merge_tool_messages, sort_tool_results
from encoding.dsml import DsmlValueError, check_tool_calls, render_tool_calls, to_json
from encoding.errors import EncodingError

THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = (None, "high", "max")  # only "max" changes the prompt


@dataclass(frozen=True)
class _Options:
    is_thinking: bool  # thinking_mode == "thinking"
    drop_thinking: bool  # after forcing it off when any message has tools
    effort_max: bool  # reasoning_effort == "max"
    last_user: int  # index of the last user/developer turn in the rendered list


def encode_messages(
    messages: Sequence[Mapping[str, Any]],
    thinking_mode: str,
    context: Sequence[Mapping[str, Any]] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
    reasoning_effort: str | None = None,
) -> str:
    """Render ``messages`` as a V4 prompt.

    ``context`` holds earlier messages whose text is already in the KV cache: they shape how
    ``messages`` render (tool-result order, the generation prefix) but are not emitted, and no
    BOS is added. ``drop_thinking`` removes reasoning from turns before the last user turn in
    thinking mode; any message with ``tools`` turns it off. ``reasoning_effort="max"`` puts
    the maximum-effort preamble first (thinking mode, first message only).
    """
    if thinking_mode not in THINKING_MODES:
        raise EncodingError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise EncodingError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")
    ctx = merge_tool_messages(context or [], "context")
    new = merge_tool_messages(messages, "messages")
    turns = ctx + new
    sort_tool_results(turns)
    is_thinking = thinking_mode == "thinking"
    dropping = bool(drop_thinking) and not any(turn.get("tools") for turn in turns)
    if is_thinking and dropping:
        turns = conversation.drop_thinking(turns)
        # The official count: messages left after dropping, minus what dropping leaves of the
        # context on its own. Kept as is so that continuation prompts match byte for byte.
        num_to_render = len(turns) - len(conversation.drop_thinking(ctx))
        first = len(turns) - num_to_render
    else:
        num_to_render, first = len(new), len(ctx)
    opts = _Options(is_thinking, dropping, reasoning_effort == "max", last_user_index(turns))
    parts = [T.BOS] if add_default_bos_token and not ctx else []
    parts.extend(_render_turn(index, turns, opts) for index in range(first, first + num_to_render))
    return "".join(parts)


def _render_turn(index: int, turns: list[Turn], opts: _Options) -> str:
    turn = turns[index]
    try:
        body = _render_body(index, turns, opts)
        return body + _transition(index, turns, opts)
    except DsmlValueError as exc:
        raise EncodingError(f"{turn.where}: {exc}") from None


def _render_body(index: int, turns: list[Turn], opts: _Options) -> str:
    turn = turns[index]
    _check_structured_fields(turn)
    prefix = T.REASONING_EFFORT_MAX if index == 0 and opts.is_thinking and opts.effort_max else ""
    role = turn.role
    if role == "system":
        return prefix + f"{turn.get('content') or ''}" + _tools_and_format(turn)
    if role == "developer":
        return prefix + T.USER + _developer_content(turn) + _tools_and_format(turn)
    if role == "user":
        return prefix + T.USER + "\n\n".join(_render_block(block) for block in turn.blocks or [])
    if role == "latest_reminder":
        return prefix + T.LATEST_REMINDER + f"{turn.get('content')}"
    if role == "assistant":
        return prefix + _render_assistant(index, turns, opts)
    raise EncodingError(f"{turn.where}: unknown role {role!r}")


def _check_structured_fields(turn: Turn) -> None:
    # The official encoder converts tools and tool_calls of every rendered message, whatever
    # its role, so malformed ones fail there even where they are not printed.
    tools = turn.get("tools")
    if tools:
        _tool_functions(tools, turn.where)
    tool_calls = turn.get("tool_calls")
    if tool_calls and turn.role != "assistant":
        check_tool_calls(tool_calls)


def _tool_functions(tools: Any, where: str) -> list[Any]:
    try:
        return [tool["function"] for tool in tools]
    except (KeyError, TypeError, IndexError) as exc:
        raise EncodingError(f"{where}: each tool needs a 'function' entry ({exc!r})") from None


def _tools_and_format(turn: Turn) -> str:
    text = ""
    tools = turn.get("tools")
    if tools:
        schemas = "\n".join(to_json(function) for function in _tool_functions(tools, turn.where))
        text += "\n\n" + T.TOOLS_PREFIX + schemas + T.TOOLS_SUFFIX
    response_format = turn.get("response_format")
    if response_format:
        text += "\n\n" + T.RESPONSE_FORMAT_PREFIX + to_json(response_format)
    return text


def _developer_content(turn: Turn) -> str:
    content = turn.get("content")
    if not content:
        raise EncodingError(f"{turn.where}: a developer message needs non-empty content")
    if not isinstance(content, str):
        raise EncodingError(f"{turn.where}: developer content must be a string, got {type(content).__name__}")
    return content


def _render_block(block: Any) -> str:
    if block.kind == "text":
        if not isinstance(block.value, str):
            kind = type(block.value).__name__
            raise EncodingError(f"{block.where}: user content must be a string, got {kind}")
        return block.value
    content = block.value
    if isinstance(content, list):
        content = "\n\n".join(_tool_result_part(part, block.where) for part in content)
    return f"<tool_result>{content}</tool_result>"


def _tool_result_part(part: Any, where: str) -> str:
    if not isinstance(part, Mapping):
        raise EncodingError(f"{where}: tool content parts must be dicts, got {type(part).__name__}")
    if part.get("type") != "text":
        return f"[Unsupported {part.get('type')}]"
    text = part.get("text", "")
    if not isinstance(text, str):
        raise EncodingError(f"{where}: tool content text must be a string, got {type(text).__name__}")
    return text


def _render_assistant(index: int, turns: list[Turn], opts: _Options) -> str:
    turn = turns[index]
    tool_calls = turn.get("tool_calls")
    calls = render_tool_calls(tool_calls) if tool_calls else ""
    # An assistant answering a task (title, query, ...) never thinks.
    after_task = index > 0 and turns[index - 1].get("task") is not None
    thinking = ""
    if opts.is_thinking and not after_task and (not opts.drop_thinking or index > opts.last_user):
        reasoning = "" if turn.reasoning_dropped else turn.get("reasoning_content")
        thinking = f"{reasoning or ''}" + T.THINK_END
    end = "" if turn.get("wo_eos", False) else T.EOS
    return thinking + f"{turn.get('content') or ''}" + calls + end


def _transition(index: int, turns: list[Turn], opts: _Options) -> str:
    """What follows turn ``index`` when the next turn is the assistant's (or the last one)."""
    if index + 1 < len(turns) and turns[index + 1].role not in ("assistant", "latest_reminder"):
        return ""
    turn = turns[index]
    task = turn.get("task")
    if task is not None:
        if not isinstance(task, str) or task not in T.TASK_TOKENS:
            raise EncodingError(f"{turn.where}: invalid task {task!r}; valid tasks: {sorted(T.TASK_TOKENS)}")
        if task != "action":
            return T.TASK_TOKENS[task]
        think = T.THINK_START if opts.is_thinking else T.THINK_END
        return T.ASSISTANT + think + T.TASK_TOKENS[task]
    if turn.role in ("user", "developer"):
        opens_thinking = opts.is_thinking and (not opts.drop_thinking or index >= opts.last_user)
        return T.ASSISTANT + (T.THINK_START if opens_thinking else T.THINK_END)
    return ""
