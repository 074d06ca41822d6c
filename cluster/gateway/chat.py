"""The Chat and Encode RPCs: protobuf requests -> the V4 encoder's messages, and completion
text -> reasoning / content deltas and parsed tool calls.

`ChatInput` validates a `ChatRequest` and renders its prompt; `start_chat` submits it
through the gateway's core; `ChatTranslator` feeds each `RequestOutput`'s text through
the streaming parser and turns its events into `ChatResponse` messages (`responses`).
`chat_rpc` and `encode_rpc` are the grpc.aio handlers; `dsv4 chat --local` drives
`start_chat` + `responses` without a server. Errors in client input are `RequestError`s
naming the field. A request whose output breaks the chat format ends with a Finish whose
finish_reason is "error".
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from cluster.engine.requests import RequestError, RequestOutput
from cluster.gateway.convert import finish_pb, logprobs_pb, to_sampling
from cluster.gateway.core import (
    REQUEST_ID_METADATA,
    Gateway,
    GatewayError,
    RequestStream,
    as_gateway_error,
    stream_out,
)
from cluster.gateway.guard import check_request_id, quote, refuse
from encoding import (
    EOS_ID,
    ArgumentsDelta,
    CompletionParseError,
    ContentDelta,
    ReasoningDelta,
    StreamingParser,
    ToolCall,
    ToolCallStart,
    encode_messages,
)
from encoding import tokens as T
from protos import load as load_protos

pb, _ = load_protos()
log = logging.getLogger("dsv4.gateway")

ROLES = ("system", "user", "assistant", "tool", "developer", "latest_reminder")
THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = ("", "high", "max")


@dataclass(frozen=True)
class ChatInput:
    """A validated ChatRequest: the encoder's messages, the prompt text and its token ids."""

    messages: list[dict[str, Any]]  # OpenAI-style dicts, as `encode_messages` takes them
    thinking_mode: str  # chat | thinking
    prompt: str
    prompt_ids: tuple[int, ...]

    @classmethod
    def from_request(cls, request: Any, tokenizer: Any) -> ChatInput:
        """Validate and render `request` (a pb ChatRequest); RequestError on bad input."""
        thinking_mode = request.thinking_mode or "chat"
        if thinking_mode not in THINKING_MODES:
            raise RequestError("thinking_mode", f"must be one of {THINKING_MODES}, got {quote(thinking_mode)}")
        if request.reasoning_effort not in REASONING_EFFORTS:
            raise RequestError(
                "reasoning_effort", f"must be one of {REASONING_EFFORTS}, got {quote(request.reasoning_effort)}"
            )
        messages = to_encoder_messages(request)
        try:
            prompt = encode_messages(messages, thinking_mode, reasoning_effort=request.reasoning_effort or None)
        except ValueError as e:  # encoding.EncodingError: the message names messages[i]
            raise RequestError("messages", str(e)) from None
        return cls(messages, thinking_mode, prompt, tuple(tokenizer.encode(prompt)))


def to_encoder_messages(request: Any) -> list[dict[str, Any]]:
    """The request's messages as OpenAI-style dicts; tools ride on the (first) system message."""
    if not request.messages:
        raise RequestError("messages", "at least one message is required")
    messages = [_message(i, m) for i, m in enumerate(request.messages)]
    tools = [_tool(i, t) for i, t in enumerate(request.tools)]
    if tools:
        system = next((m for m in messages if m["role"] == "system"), None)
        if system is None:
            messages.insert(0, system := {"role": "system", "content": ""})
        system["tools"] = tools
    return messages


def _message(index: int, m: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if m.role not in ROLES:
        raise RequestError(f"{where}.role", f"unknown role {quote(m.role)}; known roles: {', '.join(ROLES)}")
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.reasoning_content:
        out["reasoning_content"] = m.reasoning_content
    if m.tool_calls:
        out["tool_calls"] = [_tool_call(f"{where}.tool_calls[{j}]", c) for j, c in enumerate(m.tool_calls)]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def _tool_call(where: str, call: Any) -> dict[str, Any]:
    if not call.name:
        raise RequestError(f"{where}.name", "is required")
    arguments = call.arguments or "{}"
    parsed = _json(f"{where}.arguments", arguments)
    if not isinstance(parsed, dict):
        raise RequestError(f"{where}.arguments", f"must be a JSON object, got {type(parsed).__name__}")
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}


def _tool(index: int, tool: Any) -> dict[str, Any]:
    where = f"tools[{index}]"
    if not tool.name:
        raise RequestError(f"{where}.name", "is required")
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    if tool.parameters:
        schema = _json(f"{where}.parameters", tool.parameters)
        if not isinstance(schema, dict):
            raise RequestError(f"{where}.parameters", f"must be a JSON object (a schema), got {type(schema).__name__}")
        function["parameters"] = schema
    return {"type": "function", "function": function}


def _json(where: str, text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise RequestError(where, "is nested too deeply to read") from None
    except ValueError as e:
        raise RequestError(where, f"not valid JSON ({e})") from None


class ChatTranslator:
    """Engine outputs of one chat request -> ChatResponse messages.

    The engine never emits the end-of-sentence text, so when the last token is EOS the
    translator feeds the EOS text itself and holds the completion to the full format.
    A completion cut short (length, stop string, abort) is flushed leniently: what the
    parser held back is released when it can be read as reasoning or content, and an
    unfinished tool call is dropped; so is one that ends at EOS but not in the format
    (thinking mode: EOS inside the reasoning). A tool call streams as it is written
    (`tool_call_delta`s: its id and name, then pieces of its arguments), then comes whole
    (`tool_call`).

    Output that breaks the format loses nothing: from the break on, the text the client
    has not seen yet (an unfinished tool call's raw DSML included) and everything after it
    streams as content, and the finish reason is what really ended the answer;
    `format_error` says what broke (the gateway logs and counts it). With `strict`, a break
    ends the stream with finish_reason "error" instead (`failed` turns true at once, so the
    caller can abort the engine).
    """

    def __init__(self, uid: str, thinking_mode: str, eos_id: int = EOS_ID, strict: bool = False) -> None:
        self.uid = uid
        self.eos_id = eos_id
        self.strict = strict
        self.parser = StreamingParser(thinking_mode, stream_arguments=True)
        self.num_calls = 0
        self.last_token: int | None = None
        self.error: str | None = None  # strict: why the stream ended in an error
        self.format_error: str | None = None  # where and how the output broke the chat format
        self.raw = False  # past a break: text goes out as content, unparsed
        self._text: list[str] = []  # every piece of completion text so far

    @property
    def failed(self) -> bool:
        return self.error is not None

    def push(self, out: RequestOutput) -> list[Any]:
        """Responses for one engine output; the last output yields the Finish too."""
        if out.token_ids:
            self.last_token = out.token_ids[-1]
        responses: list[Any] = []
        if out.text and not self.failed:
            self._text.append(out.text)
            responses += self._feed(out.text)
        if out.logprobs:
            delta = next((r.delta for r in responses if r.WhichOneof("kind") == "delta"), None)
            if delta is None:
                responses.insert(0, pb.ChatResponse(delta=pb.ChatDelta()))
                delta = responses[0].delta
            delta.logprobs.extend(logprobs_pb(out.logprobs))
        if self.failed:
            return [*responses, pb.ChatResponse(finish=finish_pb(self.uid, out, "error", self.error))]
        if out.finished:
            responses += self._close(out)
            reason, error = ("error", self.error) if self.failed else (None, None)
            responses.append(pb.ChatResponse(finish=finish_pb(self.uid, out, reason, error)))
        return responses

    def _feed(self, text: str) -> list[Any]:
        if self.raw:
            return [pb.ChatResponse(delta=pb.ChatDelta(content=text))]
        try:
            return self._responses(self.parser.feed(text))
        except CompletionParseError as e:
            return self._broken(e)

    def _broken(self, e: CompletionParseError) -> list[Any]:
        """The output broke the format: strict, end in an error; else send the rest raw."""
        self.format_error = f"the model's output breaks the chat format {e}"
        if self.strict:
            self.error = self.format_error
            return []
        self.raw = True
        rest = "".join(self._text)[self.parser.accounted :]
        return [pb.ChatResponse(delta=pb.ChatDelta(content=rest))] if rest else []

    def _close(self, out: RequestOutput) -> list[Any]:
        if out.finish_reason == "error" or self.failed or self.raw:
            return []
        if out.finish_reason == "stop" and self.last_token == self.eos_id:
            before = copy.deepcopy(self.parser)
            try:
                return self._responses(self.parser.feed(T.EOS) + self.parser.finish())
            except CompletionParseError as e:
                if self.strict:
                    self.format_error = self.error = f"the model's output breaks the chat format {e}"
                    return []
                self.format_error = f"the model's output breaks the chat format {e}"
                self.parser = before
        return self._flush()

    def _flush(self) -> list[Any]:
        """Cut short: read the held-back tail as the end of reasoning or content if it can be;
        a tool call still open is incomplete and dropped (strict) or sent raw."""
        for suffix in ("", T.EOS, T.THINK_END + T.EOS):
            trial = copy.deepcopy(self.parser)
            try:
                events = trial.feed(suffix) + trial.finish()
            except CompletionParseError:
                continue
            calls = [e for e in events if isinstance(e, ToolCall)]
            responses = self._responses([e for e in events if isinstance(e, ReasoningDelta | ContentDelta)])
            if calls and not self.strict:  # an unfinished call: its raw text is still the model's
                rest = "".join(self._text)[self.parser.accounted :]
                responses.append(pb.ChatResponse(delta=pb.ChatDelta(content=rest)))
            return responses
        if self.strict:
            return []
        rest = "".join(self._text)[self.parser.accounted :]
        return [pb.ChatResponse(delta=pb.ChatDelta(content=rest))] if rest else []

    def _call_id(self) -> str:
        return f"call-{self.uid}-{self.num_calls}"

    def _responses(self, events: list[Any]) -> list[Any]:
        out: list[Any] = []
        for event in events:
            if isinstance(event, ReasoningDelta):
                out.append(pb.ChatResponse(delta=pb.ChatDelta(reasoning_content=event.text)))
            elif isinstance(event, ContentDelta):
                out.append(pb.ChatResponse(delta=pb.ChatDelta(content=event.text)))
            elif isinstance(event, ToolCallStart):
                delta = pb.ToolCallDelta(index=self.num_calls, id=self._call_id(), name=event.name)
                out.append(pb.ChatResponse(tool_call_delta=delta))
            elif isinstance(event, ArgumentsDelta):
                delta = pb.ToolCallDelta(index=self.num_calls, arguments=event.text)
                out.append(pb.ChatResponse(tool_call_delta=delta))
            elif isinstance(event, ToolCall):
                call_id = self._call_id()
                self.num_calls += 1
                out.append(
                    pb.ChatResponse(tool_call=pb.ToolCall(id=call_id, name=event.name, arguments=event.arguments_json))
                )
        return out


# -- the RPCs ------------------------------------------------------------------------------
async def start_chat(gateway: Gateway, request: Any) -> tuple[RequestStream, ChatTranslator]:
    """Validate, encode and submit a ChatRequest (GatewayError if it is refused)."""
    chat = await encode(gateway, request)
    engine = gateway.engine
    try:
        gateway.check_prompt(len(chat.prompt_ids), "messages")
        params = to_sampling(request.sampling, len(chat.prompt_ids), gateway.max_len(), engine.vocab_size)
    except RequestError as e:
        raise as_gateway_error(e) from None
    stream = gateway.submit(request.request_id, chat.prompt_ids, params)
    return stream, ChatTranslator(stream.uid, chat.thinking_mode, engine.eos_id, gateway.strict_output_format)


async def encode(gateway: Gateway, request: Any) -> ChatInput:
    """The request validated and rendered, off the event loop (GatewayError if refused)."""
    gateway.check_size(request)
    try:
        check_request_id(request.request_id)
        return await gateway.offload(request.ByteSize(), ChatInput.from_request, request, gateway.engine.tokenizer)
    except ValueError as e:
        raise as_gateway_error(e) from None


async def responses(gateway: Gateway, stream: RequestStream, translator: ChatTranslator) -> AsyncIterator[Any]:
    """ChatResponse messages until the Finish; output that breaks the chat format is logged
    and counted (strict: the request is aborted)."""
    try:
        async for out in stream:
            for response in translator.push(out):
                yield response
            if translator.failed:
                return
    finally:
        stream.close()
        if translator.format_error is not None:
            gateway.metrics.format_errors.inc()
            log.warning("%s: %s%s", stream.uid, translator.format_error,
                        "" if translator.strict else " (its text is sent on)")  # fmt: skip


async def chat_rpc(gateway: Gateway, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """Chat: the stream of ChatResponses; a request whose workers were lost ends UNAVAILABLE
    after its final message (retry elsewhere)."""
    try:
        stream, translator = await start_chat(gateway, request)
    except GatewayError as e:
        refuse(context, e)
        return
    context.add_done_callback(lambda _: stream.close())
    await context.send_initial_metadata(((REQUEST_ID_METADATA, stream.uid),))
    async for response in stream_out(context, stream.uid, responses(gateway, stream, translator)):
        yield response
    if stream.lost:
        await context.abort(grpc.StatusCode.UNAVAILABLE, stream.lost)


async def encode_rpc(gateway: Gateway, request: Any, context: grpc.aio.ServicerContext) -> Any:
    """Encode: the prompt a ChatRequest renders to, and its token ids."""
    try:
        chat = await encode(gateway, request)
    except GatewayError as e:
        return refuse(context, e)
    return pb.EncodeResponse(prompt=chat.prompt, token_ids=chat.prompt_ids)
