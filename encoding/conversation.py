"""Conversation preprocessing: OpenAI-style messages -> the turns the V4 renderer walks.

Three steps, in the official encoder's order (docs/model.md §11.3):
  1. merge: every ``tool`` message becomes a tool_result block of a user turn, and
     consecutive user / tool messages collapse into one user turn;
  2. sort: tool_result blocks follow the order of the calling assistant's ``tool_calls``;
  3. drop thinking (thinking mode, only when asked): history before the last user turn
     loses its reasoning, and developer turns there are removed.

The caller's dicts are never modified: turns keep a read-only reference to the original
message, and everything the encoder changes lives on the turn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from encoding.errors import EncodingError

# Roles _drop_thinking keeps even before the last user turn.
_KEPT_ROLES = frozenset({"user", "system", "tool", "latest_reminder", "direct_search_results"})
# Fields a user message carries over into its merged turn.
_USER_EXTRA_FIELDS = ("task", "wo_eos", "mask")


@dataclass
class Block:
    """One part of a merged user turn."""

    kind: str  # "text" (a user message's content) or "tool_result" (a tool message's content)
    value: Any  # the text, or the tool result content (a string or a list of content parts)
    tool_use_id: Any  # the tool message's tool_call_id ("" for text blocks)
    where: str  # the source message, e.g. "messages[3]", for error messages


@dataclass
class Turn:
    """One message as the renderer sees it."""

    msg: Mapping[str, Any]  # the source message (merged user turns: a fresh dict), read-only
    where: str  # the first source message, e.g. "context[0]"
    blocks: list[Block] | None = None  # merged user turns only
    reasoning_dropped: bool = False  # set by drop_thinking on history assistant turns

    @property
    def role(self) -> Any:
        return self.msg.get("role")

    def get(self, key: str, default: Any = None) -> Any:
        return self.msg.get(key, default)


def merge_tool_messages(messages: Sequence[Any], label: str) -> list[Turn]:
    """Fold ``tool`` messages and consecutive user messages into user turns (step 1)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise EncodingError(f"{label}: expected a list of messages, got {type(messages).__name__}")
    turns: list[Turn] = []
    for index, msg in enumerate(messages):
        where = f"{label}[{index}]"
        if not isinstance(msg, Mapping):
            raise EncodingError(f"{where}: expected a dict, got {type(msg).__name__}")
        role = msg.get("role")
        _check_hashable(role, where)
        last = turns[-1] if turns else None
        joins_user = last is not None and last.role == "user" and last.blocks is not None
        if role == "tool":
            block = Block("tool_result", msg.get("content", ""), msg.get("tool_call_id", ""), where)
            if joins_user:
                last.blocks.append(block)
            else:
                turns.append(Turn({"role": "user"}, where, blocks=[block]))
        elif role == "user":
            block = Block("text", msg.get("content", ""), "", where)
            # A user turn that asks for a task ends there: later text does not join it.
            if joins_user and last.get("task") is None:
                last.blocks.append(block)
            else:
                fields = {"role": "user", **{k: msg[k] for k in _USER_EXTRA_FIELDS if k in msg}}
                turns.append(Turn(fields, where, blocks=[block]))
        else:
            turns.append(Turn(msg, where))
    return turns


def _check_hashable(role: Any, where: str) -> None:
    try:
        hash(role)
    except TypeError:
        raise EncodingError(f"{where}: invalid role {role!r}") from None


def _call_id(call: Any, where: str) -> Any:
    if not isinstance(call, Mapping):
        raise EncodingError(f"{where}: each tool call must be a dict, got {type(call).__name__}")
    call_id = call.get("id")
    if call_id:
        return call_id
    function = call.get("function", {})
    if not isinstance(function, Mapping):
        raise EncodingError(f"{where}: tool call 'function' must be a dict")
    return function.get("id", "")


def sort_tool_results(turns: list[Turn]) -> None:
    """Reorder each user turn's tool_result blocks by the last assistant's call order (step 2).

    Text blocks keep their slots; tool results fill the tool-result slots in call order.
    Results whose id is unknown sort as if they answered the first call (stable sort).
    """
    call_order: dict[Any, int] = {}
    for turn in turns:
        if turn.role == "assistant" and turn.get("tool_calls"):
            calls = turn.get("tool_calls")
            if not isinstance(calls, Sequence) or isinstance(calls, str | bytes):
                raise EncodingError(f"{turn.where}: tool_calls must be a list, got {type(calls).__name__}")
            ids = [_call_id(call, turn.where) for call in calls]
            call_order = {call_id: i for i, call_id in enumerate(ids) if call_id}
        elif turn.blocks:
            results = [b for b in turn.blocks if b.kind == "tool_result"]
            if len(results) < 2 or not call_order:
                continue
            try:
                ordered = iter(sorted(results, key=lambda b: call_order.get(b.tool_use_id, 0)))
            except TypeError as exc:  # an unhashable tool_call_id
                raise EncodingError(f"{turn.where}: invalid tool_call_id ({exc})") from None
            turn.blocks = [next(ordered) if b.kind == "tool_result" else b for b in turn.blocks]


def last_user_index(turns: Sequence[Turn]) -> int:
    """Index of the last user or developer turn, or -1."""
    for index in range(len(turns) - 1, -1, -1):
        if turns[index].role in ("user", "developer"):
            return index
    return -1


def drop_thinking(turns: list[Turn]) -> list[Turn]:
    """Strip history before the last user turn (step 3).

    Before that turn, assistants lose their reasoning and turns of other roles that are not
    conversation content (developer, unknown roles) disappear.
    """
    last_user = last_user_index(turns)
    kept: list[Turn] = []
    for index, turn in enumerate(turns):
        if turn.role in _KEPT_ROLES or index >= last_user:
            kept.append(turn)
        elif turn.role == "assistant":
            kept.append(replace(turn, reasoning_dropped=True))
    return kept
