"""Shared test helpers: the V4 special strings written out by hand, and stream drivers.

The strings are spelled here rather than imported from ``encoding`` so that a typo in the
package cannot hide behind the same typo in the expected values.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from encoding import ContentDelta, End, ReasoningDelta, StreamingParser, ToolCall

VECTORS = Path(__file__).parent / "vectors"

BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
USER = "<\uff5cUser\uff5c>"
ASSISTANT = "<\uff5cAssistant\uff5c>"
REMINDER = "<\uff5clatest_reminder\uff5c>"
DSML = "\uff5cDSML\uff5c"


def dsml_calls(calls: Sequence[tuple[str, Sequence[tuple[str, str, str]]]]) -> str:
    """A tool-call block as the model writes it: [(name, [(key, "true"/"false", raw), ...])]."""
    invokes = []
    for name, params in calls:
        lines = [f'<{DSML}invoke name="{name}">']
        lines += [f'<{DSML}parameter name="{key}" string="{flag}">{raw}</{DSML}parameter>' for key, flag, raw in params]
        lines.append(f"</{DSML}invoke>")
        invokes.append("\n".join(lines))
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def load_vector(number: int) -> tuple[list[dict[str, Any]], str]:
    """(messages, expected prompt) of official example ``number``; tools go on message 0."""
    data = json.loads((VECTORS / f"test_input_{number}.json").read_text(encoding="utf-8"))
    if isinstance(data, dict):
        messages = data["messages"]
        messages[0]["tools"] = data["tools"]
    else:
        messages = data
    expected = (VECTORS / f"test_output_{number}.txt").read_text(encoding="utf-8")
    return messages, expected


def collect(events: Iterable[object]) -> dict[str, Any]:
    """Fold streaming events into the dict parse_message_from_completion_text returns."""
    events = list(events)
    ends = [i for i, event in enumerate(events) if isinstance(event, End)]
    assert ends == [len(events) - 1], f"expected exactly one End, last: {events[-3:]}"
    return {
        "role": "assistant",
        "content": "".join(e.text for e in events if isinstance(e, ContentDelta)),
        "reasoning_content": "".join(e.text for e in events if isinstance(e, ReasoningDelta)),
        "tool_calls": [
            {"type": "function", "function": {"name": e.name, "arguments": e.arguments_json}}
            for e in events
            if isinstance(e, ToolCall)
        ],
    }


def stream_pieces(pieces: Iterable[str], thinking_mode: str) -> dict[str, Any]:
    """Feed ``pieces`` one by one to a StreamingParser and fold the events."""
    parser = StreamingParser(thinking_mode)
    events: list[object] = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    return collect(events)


def split_at(text: str, cuts: Iterable[int]) -> list[str]:
    """``text`` cut at the given character indices (any order, duplicates allowed)."""
    bounds = [0, *sorted(set(cuts)), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# -- message and DSML builders -------------------------------------------------------


def user(text: str, **extra: Any) -> dict[str, Any]:
    return {"role": "user", "content": text, **extra}


def assistant(content: str | None = None, reasoning: str | None = None, **extra: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content, **extra}
    if reasoning is not None:
        msg["reasoning_content"] = reasoning
    return msg


def call(name: str, arguments: Any, call_id: str | None = None) -> dict[str, Any]:
    tc: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id is not None:
        tc["id"] = call_id
    return tc


def tool(content: Any, call_id: str = "") -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def block(*invokes: str) -> str:
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def invoke(name: str, *params: str) -> str:
    return f'<{DSML}invoke name="{name}">\n' + "\n".join(params) + f"\n</{DSML}invoke>"


def param(key: str, flag: str, value: str) -> str:
    return f'<{DSML}parameter name="{key}" string="{flag}">{value}</{DSML}parameter>'
