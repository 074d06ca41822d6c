"""`dsv4 chat`'s client side: build a ChatRequest, stream it (from a server or a local
gateway), and print reasoning, content, tool calls and usage as they arrive.

Content and tool calls go to stdout; reasoning ("thinking: ...", dimmed on a terminal)
and the closing usage line go to stderr, so `dsv4 chat "..." > answer.txt` keeps only
the answer.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterable
from typing import Any, TextIO

import grpc

from protos import load as load_protos

pb, pb_grpc = load_protos()

_DIM, _RESET = "\033[2m", "\033[0m"


class ChatClientError(ValueError):
    """The gateway could not be reached or refused the request; printed without a traceback."""


TLS_CA_ENV = "DSV4_TLS_CA"  # a PEM file: talk TLS to gateways whose certificate it signs


def channel(target: str, tls_ca: str | None = None) -> grpc.Channel:
    """A channel to the gateway at `target`: TLS trusting the PEM file `tls_ca` (default
    $DSV4_TLS_CA) when one is given, plaintext otherwise."""
    ca = tls_ca or os.environ.get(TLS_CA_ENV)
    if not ca:
        return grpc.insecure_channel(target)
    try:
        root = open(ca, "rb").read()  # noqa: SIM115 (read at once)
    except OSError as e:
        raise ChatClientError(f"--tls-ca / ${TLS_CA_ENV}: cannot read {ca}: {e.strerror}") from None
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root))


def chat_request(
    text: str,
    *,
    system: str | None = None,
    thinking: bool = False,
    max_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    history: Iterable[Any] = (),
) -> Any:
    """A ChatRequest: `history` (earlier turns' ChatMessages), then the user's `text`; unset
    sampling fields keep the server's defaults."""
    messages = [pb.ChatMessage(role="system", content=system)] if system else []
    messages += list(history)
    messages.append(pb.ChatMessage(role="user", content=text))
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    return pb.ChatRequest(messages=messages, thinking_mode="thinking" if thinking else "chat", sampling=sampling)


class ChatPrinter:
    """Prints one chat stream's messages as they come."""

    def __init__(self, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.out, self.err = out, err
        self.dim = err.isatty()
        self._in_reasoning = False
        self._wrote_content = False
        self.finish: Any = None
        self.content: list[str] = []  # the answer's content, as received
        self.reasoning: list[str] = []

    def handle(self, response: Any) -> None:
        kind = response.WhichOneof("kind")
        if kind == "delta":
            if response.delta.reasoning_content:
                self._reasoning(response.delta.reasoning_content)
                self.reasoning.append(response.delta.reasoning_content)
            if response.delta.content:
                self.content.append(response.delta.content)
                self._end_reasoning()
                self.out.write(response.delta.content)
                self.out.flush()
                self._wrote_content = True
        elif kind == "tool_call":
            self._end_reasoning()
            call = response.tool_call
            self.out.write(
                f"{chr(10) if self._wrote_content else ''}tool call {call.id}: {call.name}({call.arguments})\n"
            )
            self.out.flush()
            self._wrote_content = False
        elif kind == "finish":
            self._end_reasoning()
            self.finish = response.finish
            self._usage(response.finish)

    def _reasoning(self, text: str) -> None:
        if not self._in_reasoning:
            self.err.write((_DIM if self.dim else "") + "thinking: ")
            self._in_reasoning = True
        self.err.write(text)
        self.err.flush()

    def _end_reasoning(self) -> None:
        if self._in_reasoning:
            self.err.write((_RESET if self.dim else "") + "\n")
            self.err.flush()
            self._in_reasoning = False

    def _usage(self, finish: Any) -> None:
        if self._wrote_content:
            self.out.write("\n")
            self.out.flush()
        u = finish.usage
        line = (
            f"[finish: {finish.finish_reason}; usage: prompt {u.prompt_tokens}, completion {u.completion_tokens}, "
            f"cached {u.cached_tokens} tokens; first token after {finish.time_to_first_token_ms:.0f} ms]"
        )
        if finish.error:
            line += f"\nerror: {finish.error}"
        self.err.write(line + "\n")
        self.err.flush()


def print_stream(responses: Iterable[Any], printer: ChatPrinter) -> None:
    for response in responses:
        printer.handle(response)


async def print_async_stream(responses: AsyncIterator[Any], printer: ChatPrinter) -> None:
    async for response in responses:
        printer.handle(response)


def chat_remote(target: str, request: Any, printer: ChatPrinter, timeout: float | None = None,
                tls_ca: str | None = None) -> None:  # fmt: skip
    """Stream `request` from the gateway at `target`; ChatClientError on RPC failure."""
    with channel(target, tls_ca) as ch:
        stub = pb_grpc.InferenceStub(ch)
        try:
            print_stream(stub.Chat(request, timeout=timeout), printer)
        except grpc.RpcError as e:
            code, details = e.code(), e.details()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.UNAVAILABLE and "draining" not in (details or ""):
                raise ChatClientError(
                    f"cannot reach a dsv4 gateway at {target} ({details}); is `dsv4 serve` running there?"
                ) from None
            raise ChatClientError(f"the gateway at {target} answered {code.name}: {details}") from None


# -- operations ----------------------------------------------------------------------------
def _unary(target: str, method: str, request: Any, timeout: float) -> Any:
    with channel(target) as ch:
        try:
            return getattr(pb_grpc.InferenceStub(ch), method)(request, timeout=timeout)
        except grpc.RpcError as e:
            code, details = e.code(), e.details()  # type: ignore[attr-defined]
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ChatClientError(f"cannot reach a dsv4 gateway at {target} ({details})") from None
            raise ChatClientError(f"the gateway at {target} answered {code.name}: {details}") from None


def server_info(target: str, timeout: float = 10.0) -> Any:
    """GetServerInfo from the gateway at `target`; ChatClientError if unreachable."""
    return _unary(target, "GetServerInfo", pb.GetServerInfoRequest(), timeout)


def drain(target: str, timeout: float = 10.0) -> Any:
    """Ask the gateway at `target` to stop admitting requests; returns the DrainResponse."""
    return _unary(target, "Drain", pb.DrainRequest(), timeout)
