"""Chat over the engine: protobuf requests -> the V4 encoder's messages, and completion text
-> reasoning / content deltas and parsed tool calls.

Two halves, both free of gRPC plumbing so the local CLI and the server share them:
`ChatInput` validates a `ChatRequest` and renders its prompt; `ChatTranslator` feeds each
`RequestOutput`'s text through the streaming parser and turns its events into
`ChatResponse` messages. Errors in client input are `RequestError`s naming the field.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from cluster.messages import RequestError, RequestOutput, SamplingParams, TokenLogprob
from encoding import (
    EOS_ID,
    CompletionParseError,
    ContentDelta,
    ReasoningDelta,
    StreamingParser,
    ToolCall,
    encode_messages,
)
from encoding import tokens as T
from protos import load as load_protos

pb, _ = load_protos()

ROLES = ("system", "user", "assistant", "tool", "developer", "latest_reminder")
THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = ("", "high", "max")
DEFAULT_MAX_TOKENS = 256


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
            raise RequestError("thinking_mode", f"must be one of {THINKING_MODES}, got {thinking_mode!r}")
        if request.reasoning_effort not in REASONING_EFFORTS:
            raise RequestError(
                "reasoning_effort", f"must be one of {REASONING_EFFORTS}, got {request.reasoning_effort!r}"
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
        raise RequestError(f"{where}.role", f"unknown role {m.role!r}; known roles: {', '.join(ROLES)}")
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
    except (ValueError, RecursionError) as e:
        raise RequestError(where, f"not valid JSON ({e})") from None


def to_sampling(p: Any, prompt_len: int, max_model_len: int, vocab_size: int) -> SamplingParams:
    """A pb SamplingParams with server defaults filled in, validated (RequestError)."""
    if prompt_len >= max_model_len:
        raise RequestError(
            "messages", f"the prompt is {prompt_len} tokens; the maximum context is {max_model_len} tokens"
        )
    bad_stop = next((t for t in p.stop_token_ids if not 0 <= t < vocab_size), None)
    if bad_stop is not None:
        raise RequestError(
            "sampling.stop_token_ids", f"token id {bad_stop} is outside the vocabulary [0, {vocab_size})"
        )
    params = SamplingParams(
        max_tokens=p.max_tokens if p.HasField("max_tokens") else min(DEFAULT_MAX_TOKENS, max_model_len - prompt_len),
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k,
        min_p=p.min_p,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs,
    )
    params.validate()
    return params


def logprobs_pb(logprobs: tuple[TokenLogprob, ...]) -> list[Any]:
    return [
        pb.TokenLogprob(
            token_id=lp.token_id, logprob=lp.logprob, top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]
        )
        for lp in logprobs
    ]


def finish_pb(uid: str, out: RequestOutput, reason: str | None = None, error: str | None = None) -> Any:
    """The closing Finish message; `reason`/`error` override the engine's."""
    usage = pb.Usage(
        prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens, cached_tokens=out.cached_tokens
    )
    return pb.Finish(
        finish_reason=reason or out.finish_reason or "",
        usage=usage,
        time_to_first_token_ms=out.time_to_first_token_ms,
        error=error if error is not None else out.error or "",
        request_id=uid,
    )


class ChatTranslator:
    """Engine outputs of one chat request -> ChatResponse messages.

    The engine never emits the end-of-sentence text, so when the last token is EOS the
    translator feeds the EOS text itself and holds the completion to the full format.
    A completion cut short (length, stop string, abort) is flushed leniently: what the
    parser held back is released when it can be read as reasoning or content, and an
    unfinished tool call is dropped. Output that breaks the format ends the stream with
    finish_reason "error" (`failed` turns true at once, so the caller can abort the engine).
    """

    def __init__(self, uid: str, thinking_mode: str, eos_id: int = EOS_ID) -> None:
        self.uid = uid
        self.eos_id = eos_id
        self.parser = StreamingParser(thinking_mode)
        self.num_calls = 0
        self.last_token: int | None = None
        self.error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def push(self, out: RequestOutput) -> list[Any]:
        """Responses for one engine output; the last output yields the Finish too."""
        if out.token_ids:
            self.last_token = out.token_ids[-1]
        responses: list[Any] = []
        if out.text and not self.failed:
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
        try:
            return self._responses(self.parser.feed(text))
        except CompletionParseError as e:
            self.error = f"the model's output breaks the chat format {e}"
            return []

    def _close(self, out: RequestOutput) -> list[Any]:
        if out.finish_reason == "error" or self.failed:
            return []
        if out.finish_reason == "stop" and self.last_token == self.eos_id:
            try:
                return self._responses(self.parser.feed(T.EOS) + self.parser.finish())
            except CompletionParseError as e:
                self.error = f"the model's output breaks the chat format {e}"
                return []
        # Cut short: read the held-back tail as the end of reasoning or content if it can be;
        # a tool call still open is incomplete and dropped.
        for suffix in ("", T.EOS, T.THINK_END + T.EOS):
            trial = copy.deepcopy(self.parser)
            try:
                events = trial.feed(suffix) + trial.finish()
            except CompletionParseError:
                continue
            return self._responses([e for e in events if not isinstance(e, ToolCall)])
        return []

    def _responses(self, events: list[Any]) -> list[Any]:
        out: list[Any] = []
        for event in events:
            if isinstance(event, ReasoningDelta):
                out.append(pb.ChatResponse(delta=pb.ChatDelta(reasoning_content=event.text)))
            elif isinstance(event, ContentDelta):
                out.append(pb.ChatResponse(delta=pb.ChatDelta(content=event.text)))
            elif isinstance(event, ToolCall):
                call_id = f"call-{self.uid}-{self.num_calls}"
                self.num_calls += 1
                out.append(
                    pb.ChatResponse(tool_call=pb.ToolCall(id=call_id, name=event.name, arguments=event.arguments_json))
                )
        return out
