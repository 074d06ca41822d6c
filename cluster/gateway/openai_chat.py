"""POST /v1/chat/completions: OpenAI's chat API with DeepSeek's semantics, over the same
gateway core, encoding and streaming translation as the gRPC Chat (cluster/gateway/chat.py).

The request becomes a `dsv4.v1.ChatRequest` (so it is validated and encoded exactly like a
gRPC one), and each `ChatResponse` the translator yields becomes an OpenAI chunk:

- `reasoning_content` in stream deltas and messages (DeepSeek's API); on input an assistant
  message may carry `reasoning_content` or `reasoning`, kept on tool-call turns.
- Thinking on / off: `thinking: {"type": "enabled" | "disabled"}` (DeepSeek),
  `chat_template_kwargs: {"thinking": true}` (vLLM / SGLang), else the server's default;
  `reasoning_effort` `high` / `max` (`low`, `medium` -> high; `xhigh` -> max).
- `tools`, `tool_choice` `auto` / `none` (others: 400), `tool_calls` in the answer (finish
  reason `tool_calls`); streamed, a call's arguments arrive as the model writes them.
- `stream` (server-sent events, `data: [DONE]`), `stream_options.include_usage` (with
  `prompt_tokens_details.cached_tokens`), `logprobs` / `top_logprobs`, `stop`, `seed`,
  `max_tokens` / `max_completion_tokens`, `n`, `temperature`, `top_p` (and `top_k`, `min_p`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict

from cluster.gateway.chat import responses, start_chat
from cluster.gateway.core import Gateway, RequestStream
from cluster.gateway.openai_common import ApiError, logprobs_json, sampling_pb, sse, usage_json
from protos import load as load_protos

pb, _ = load_protos()

EFFORTS = {"": "", "low": "high", "medium": "high", "high": "high", "max": "max", "xhigh": "max"}
FINISH = {"stop": "stop", "length": "length", "abort": "abort", "error": "error"}


class ChatCompletionRequest(BaseModel):
    """The fields this server reads; others are accepted and ignored, as OpenAI SDKs send many."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int | None = None
    thinking: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    ignore_eos: bool = False  # (vLLM's extension) keep generating past end-of-sentence: benchmarks


# -- request -------------------------------------------------------------------------------
def thinking_mode(req: ChatCompletionRequest, default_thinking: bool) -> str:
    if req.thinking is not None:
        kind = req.thinking.get("type")
        if kind not in ("enabled", "disabled"):
            raise ApiError(400, f"thinking.type must be 'enabled' or 'disabled', got {kind!r}", "thinking.type")
        return "thinking" if kind == "enabled" else "chat"
    kwargs = req.chat_template_kwargs or {}
    if "thinking" in kwargs:
        return "thinking" if kwargs["thinking"] else "chat"
    return "thinking" if default_thinking else "chat"


def to_chat_request(req: ChatCompletionRequest, default_thinking: bool) -> Any:
    """The OpenAI request as a dsv4.v1.ChatRequest (400 naming the parameter on bad input)."""
    if req.reasoning_effort is not None and req.reasoning_effort not in EFFORTS:
        raise ApiError(400, f"reasoning_effort must be one of {', '.join(k for k in EFFORTS if k)}, "
                            f"got {req.reasoning_effort!r}", "reasoning_effort")  # fmt: skip
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    if choice not in ("auto", "none"):
        raise ApiError(400, f"tool_choice {choice!r} is not supported; use 'auto' or 'none'", "tool_choice")
    messages = [_message(i, m) for i, m in enumerate(req.messages)]
    tools = [] if choice == "none" else [_tool(i, t) for i, t in enumerate(req.tools or [])]
    return pb.ChatRequest(messages=messages, tools=tools, thinking_mode=thinking_mode(req, default_thinking),
                          reasoning_effort=EFFORTS[req.reasoning_effort or ""], sampling=_sampling(req))  # fmt: skip


def _sampling(req: ChatCompletionRequest) -> Any:
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    top = req.top_logprobs or 0
    return sampling_pb(max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None
                       else req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                       min_p=req.min_p, seed=req.seed, stop=req.stop,
                       logprobs=max(top, 1) if req.logprobs else 0, ignore_eos=req.ignore_eos)  # fmt: skip


def _text(where: str, content: Any) -> str:
    """A message's content: a string, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, "only text content parts are supported", f"{where}.content[{j}]")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"content must be a string or a list of text parts, got {type(content).__name__}",
                   f"{where}.content")  # fmt: skip


def _message(i: int, m: dict[str, Any]) -> Any:
    where = f"messages[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ApiError(400, "each message needs a string role", f"{where}.role")
    reasoning = m.get("reasoning_content") or m.get("reasoning") or ""
    calls = []
    for j, call in enumerate(m.get("tool_calls") or []):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise ApiError(400, "a tool call needs a function", f"{where}.tool_calls[{j}].function")
        arguments = fn.get("arguments") or "{}"
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        calls.append(pb.ToolCall(id=str(call.get("id") or ""), name=str(fn.get("name") or ""), arguments=arguments))
    return pb.ChatMessage(role=m["role"], content=_text(where, m.get("content")), reasoning_content=str(reasoning),
                          tool_calls=calls, tool_call_id=str(m.get("tool_call_id") or ""))  # fmt: skip


def _tool(i: int, tool: dict[str, Any]) -> Any:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or tool.get("type", "function") != "function":
        raise ApiError(400, "tools must be {'type': 'function', 'function': {...}}", f"tools[{i}]")
    params = fn.get("parameters")
    return pb.Tool(name=str(fn.get("name") or ""), description=str(fn.get("description") or ""),
                   parameters=json.dumps(params) if params is not None else "")  # fmt: skip


# -- response ------------------------------------------------------------------------------
class Choice:
    """One choice's answer as it streams: OpenAI deltas from the translator's responses."""

    def __init__(self, index: int, tokenizer: Any) -> None:
        self.index, self.tokenizer = index, tokenizer
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.logprobs: list[dict[str, Any]] = []
        self.finish: Any = None
        self.streamed = 0  # calls whose deltas were sent

    def delta(self, response: Any, top_n: int) -> dict[str, Any] | None:
        """The chunk choice for one ChatResponse (None for the Finish: `finish` keeps it)."""
        kind = response.WhichOneof("kind")
        if kind == "finish":
            self.finish = response.finish
            return None
        delta: dict[str, Any] = {}
        logprobs = None
        if kind == "delta":
            d = response.delta
            if d.reasoning_content:
                delta["reasoning_content"] = d.reasoning_content
                self.reasoning.append(d.reasoning_content)
            if d.content:
                delta["content"] = d.content
                self.content.append(d.content)
            if d.logprobs:
                logprobs = logprobs_json(d.logprobs, top_n, self.tokenizer)
                self.logprobs += logprobs
        elif kind == "tool_call_delta":  # a call as it is written: streamed piece by piece
            d = response.tool_call_delta
            piece: dict[str, Any] = {"index": d.index, "function": {"arguments": d.arguments}}
            if d.id:
                piece.update(id=d.id, type="function")
                piece["function"]["name"] = d.name
                self.streamed = d.index + 1
            delta["tool_calls"] = [piece]
        elif kind == "tool_call":
            call = {
                "id": response.tool_call.id,
                "type": "function",
                "function": {"name": response.tool_call.name, "arguments": response.tool_call.arguments},
            }
            self.calls.append(call)
            if len(self.calls) > self.streamed:  # (not streamed before: send it whole)
                delta["tool_calls"] = [{"index": len(self.calls) - 1, **call}]
        out: dict[str, Any] = {"index": self.index, "delta": delta, "finish_reason": None}
        if logprobs is not None:
            out["logprobs"] = {"content": logprobs}
        return out

    @property
    def finish_reason(self) -> str:
        reason = FINISH.get(self.finish.finish_reason if self.finish else "error", "error")
        return "tool_calls" if reason == "stop" and self.calls else reason

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) or None}
        if self.reasoning:
            msg["reasoning_content"] = "".join(self.reasoning)
        if self.calls:
            msg["tool_calls"] = self.calls
        return msg


async def start(
    gateway: Gateway, req: ChatCompletionRequest, default_thinking: bool
) -> list[tuple[RequestStream, Any]]:
    """Submit the request's `n` choices (seeded `seed + i` when a seed is given)."""
    if not 1 <= req.n <= 16:
        raise ApiError(400, f"n must be in [1, 16], got {req.n}", "n")
    chat = to_chat_request(req, default_thinking)
    started = []
    try:
        for i in range(req.n):
            one = pb.ChatRequest()
            one.CopyFrom(chat)
            if req.seed is not None:
                one.sampling.seed = req.seed + i
            started.append(await start_chat(gateway, one))
    except BaseException:
        for stream, _ in started:
            stream.close()
        raise
    return started


async def merged(gateway: Gateway, started: list[tuple[RequestStream, Any]]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, ChatResponse) from every choice's stream, as they come."""
    if len(started) == 1:
        async for response in responses(gateway, *started[0]):
            yield 0, response
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream, translator: Any) -> None:
        try:
            async for response in responses(gateway, stream, translator):
                await queue.put((i, response))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s, t)) for i, (s, t) in enumerate(started)]
    try:
        ended = 0
        while ended < len(tasks):
            i, response = await queue.get()
            if response is None:
                ended += 1
            else:
                yield i, response
    finally:
        for task in tasks:
            task.cancel()
        for stream, _ in started:
            stream.close()


def _head(uid: str, model: str) -> dict[str, Any]:
    return {"id": f"chatcmpl-{uid}", "created": int(time.time()), "model": model}


async def stream_events(gateway: Gateway, req: ChatCompletionRequest, started: list, model: str) -> AsyncIterator[str]:
    """The server-sent events of a streamed completion."""
    choices = [Choice(i, gateway.engine.tokenizer) for i in range(len(started))]
    head = {**_head(started[0][0].uid, model), "object": "chat.completion.chunk"}
    top_n = req.top_logprobs or 0
    for i in range(len(started)):  # the role first, as OpenAI does
        yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]})  # fmt: skip
    async for i, response in merged(gateway, started):
        chunk = choices[i].delta(response, top_n)
        if chunk is not None and chunk["delta"] or chunk is not None and "logprobs" in chunk:
            yield sse({**head, "choices": [chunk]})
        if choices[i].finish is not None:
            yield sse({**head, "choices": [{"index": i, "delta": {}, "finish_reason": choices[i].finish_reason}]})
            if choices[i].finish.error:
                yield sse({"error": {"message": choices[i].finish.error, "type": "server_error", "param": None,
                                     "code": None}})  # fmt: skip
    if (req.stream_options or {}).get("include_usage"):
        yield sse({**head, "choices": [], "usage": usage_json([c.finish for c in choices])})
    yield "data: [DONE]\n\n"


async def complete(gateway: Gateway, req: ChatCompletionRequest, started: list, model: str) -> dict[str, Any]:
    """The whole completion as one response body (an error finish: ApiError 500/503)."""
    choices = [Choice(i, gateway.engine.tokenizer) for i in range(len(started))]
    top_n = req.top_logprobs or 0
    async for i, response in merged(gateway, started):
        choices[i].delta(response, top_n)
    for c, (stream, _) in zip(choices, started, strict=True):
        if c.finish is None or c.finish.finish_reason == "error":
            why = c.finish.error if c.finish is not None else "the request ended without an answer"
            raise ApiError(503 if stream.lost else 500, why, None, "server_error")
    body = [{"index": c.index, "message": c.message(), "finish_reason": c.finish_reason,
             "logprobs": {"content": c.logprobs} if req.logprobs else None} for c in choices]  # fmt: skip
    return {**_head(started[0][0].uid, model), "object": "chat.completion", "choices": body,
            "usage": usage_json([c.finish for c in choices])}  # fmt: skip
