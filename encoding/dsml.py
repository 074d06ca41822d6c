"""DSML, the markup V4 uses for tool calls, in both directions.

Rendering (an assistant's OpenAI ``tool_calls`` -> DSML text)::

    \\n\\n<｜DSML｜tool_calls>
    <｜DSML｜invoke name="NAME">
    <｜DSML｜parameter name="KEY" string="true">raw string</｜DSML｜parameter>
    <｜DSML｜parameter name="KEY" string="false">JSON value</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

Decoding rebuilds ``arguments`` as a JSON object string from the parsed parameters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from encoding.tokens import DSML

# The official parser's patterns. ``$`` (not ``\Z``) on purpose: it also matches before one
# trailing newline, and the parse results must agree with the official parser byte for byte.
INVOKE_NAME_RE = re.compile(r'^\s*name="(.*?)">\n$', re.DOTALL)
PARAMETER_RE = re.compile(r'^ name="(.*?)" string="(true|false)">(.*?)<$', re.DOTALL)


class DsmlValueError(ValueError):
    """A tool call the renderer cannot express; the caller adds which message it was."""


def to_json(value: Any) -> str:
    """``json.dumps`` as the official encoder calls it (non-ASCII kept, ASCII as fallback)."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        try:
            return json.dumps(value, ensure_ascii=True)
        except (TypeError, ValueError, RecursionError) as exc:
            raise DsmlValueError(f"value is not JSON serializable ({exc})") from None


def _parse_arguments(arguments: Any) -> Mapping[str, Any]:
    # Invalid JSON (or a non-string) is kept whole as one parameter called "arguments".
    try:
        parsed = json.loads(arguments)
    except (TypeError, ValueError, RecursionError):
        return {"arguments": arguments}
    if not isinstance(parsed, dict):
        raise DsmlValueError(f"tool call arguments must be a JSON object, got {type(parsed).__name__}")
    return parsed


def render_parameters(arguments: Any) -> str:
    """The parameter lines of one invoke, one per argument."""
    lines = []
    for key, value in _parse_arguments(arguments).items():
        is_str = isinstance(value, str)
        text = value if is_str else to_json(value)
        flag = "true" if is_str else "false"
        lines.append(f'<{DSML}parameter name="{key}" string="{flag}">{text}</{DSML}parameter>')
    return "\n".join(lines)


def _name_and_arguments(call: Any) -> tuple[Any, Any]:
    try:
        function = call["function"]
        return function["name"], function["arguments"]
    except (KeyError, TypeError, IndexError) as exc:
        raise DsmlValueError(f"tool call needs function.name and function.arguments ({exc!r})") from None


def check_tool_calls(tool_calls: Any) -> list[tuple[Any, Any]]:
    """(name, arguments) of each OpenAI-format tool call; raises DsmlValueError if malformed."""
    if not isinstance(tool_calls, Sequence) or isinstance(tool_calls, str | bytes):
        raise DsmlValueError(f"tool_calls must be a list, got {type(tool_calls).__name__}")
    return [_name_and_arguments(call) for call in tool_calls]


def render_tool_calls(tool_calls: Any) -> str:
    """The DSML block for an assistant's tool calls, with its two leading newlines."""
    invokes = [
        f'<{DSML}invoke name="{name}">\n{render_parameters(arguments)}\n</{DSML}invoke>'
        for name, arguments in check_tool_calls(tool_calls)
    ]
    body = "\n".join(invokes)
    return f"\n\n<{DSML}tool_calls>\n{body}\n</{DSML}tool_calls>"


def arguments_json(parameters: Mapping[str, tuple[str, str]]) -> str:
    """Rebuild ``arguments``: string="true" values get JSON-quoted, others go in verbatim."""
    items = [
        f"{to_json(key)}: {to_json(value) if flag == 'true' else value}" for key, (value, flag) in parameters.items()
    ]
    return "{" + ", ".join(items) + "}"


def openai_tool_call(name: str, arguments: str) -> dict[str, Any]:
    """The OpenAI-format dict the parser returns for one call (no id, like the official one)."""
    return {"type": "function", "function": {"name": name, "arguments": arguments}}
