"""`dsv4 chat`: one message, or (without one) an interactive session, against a gateway or,
with `--local`, the same gateway code driven in this process (no server)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cluster.cli.serve import DEFAULT_TARGET, ServeError, add_model_flags, resolve_manifest

if TYPE_CHECKING:
    from cluster.engine.engine import Engine
    from cluster.gateway.client import ChatPrinter
    from cluster.gateway.core import ServingInfo

HELP = "commands: /thinking (toggle thinking mode), /reset (forget the conversation), /exit (or Ctrl-D)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a model: stream reasoning, content, tool calls and usage",
        description="Send one user message to a dsv4 gateway (or, with --local, to a model loaded here) "
        "and print the answer as it streams. Without a message: an interactive session that keeps the "
        f"conversation ({HELP}).",
    )
    p.add_argument("text", nargs="?", help="the user message (none: an interactive session)")
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"gateway HOST:PORT (default {DEFAULT_TARGET})")
    p.add_argument("--local", action="store_true", help="load the model in this process instead of calling a server")
    p.add_argument("--thinking", action="store_true", help="thinking mode: reason first (printed apart)")
    p.add_argument("--max-tokens", type=int, help="completion tokens at most (default: the server's, 256)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default 1.0)")
    p.add_argument("--seed", type=int, help="sampling seed (default random)")
    p.add_argument("--system", help="a system message")
    p.add_argument("--timeout", type=float, help="seconds before the request is cancelled (remote only)")
    p.add_argument("--tls-ca", metavar="PEM",
                   help="talk TLS to a gateway serving gateway.tls, trusting this CA (or its own certificate); "
                   "default: $DSV4_TLS_CA, else plaintext")  # fmt: skip
    add_model_flags(p, local_only=True)
    p.set_defaults(func=chat_main)


def chat_main(args: argparse.Namespace) -> None:
    if not args.local and (args.checkpoint or args.preset):
        raise ServeError("--checkpoint and --preset choose the model of --local; a server serves its own")
    if args.local:
        from cluster.assembly.build import boot

        manifest = resolve_manifest(args)
        engine, info = boot(manifest)
        strict = manifest.gateway.strict_output_format
        try:
            _run(args, lambda request, printer: asyncio.run(_chat_local(engine, info, request, printer, strict)))
        finally:
            engine.stop(drain=False, timeout=5)
    else:
        _run(args, lambda request, printer: _chat_remote(args, request, printer))


def _run(args: argparse.Namespace, send: Callable[[Any, ChatPrinter], None]) -> None:
    if args.text is not None:
        _check_answer(_turn(args, send, args.text, args.thinking, []))
    else:
        interactive(args, send)


def _turn(args: argparse.Namespace, send: Callable, text: str, thinking: bool, history: list) -> ChatPrinter:
    from cluster.gateway.client import ChatPrinter, chat_request

    request = chat_request(text, system=args.system, thinking=thinking, max_tokens=args.max_tokens,
                           temperature=args.temperature, seed=args.seed, history=history)  # fmt: skip
    printer = ChatPrinter()
    send(request, printer)
    return printer


def interactive(args: argparse.Namespace, send: Callable, read: Callable[[str], str] = input) -> None:
    """Read user turns until /exit or end of input; each answer joins the conversation."""
    from protos import load as load_protos

    pb, _ = load_protos()
    thinking, history = args.thinking, []
    print(f"dsv4 chat ({'thinking' if thinking else 'chat'} mode). {HELP}", file=sys.stderr)
    while True:
        try:
            text = read("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/thinking":
            thinking = not thinking
            print(f"thinking mode {'on' if thinking else 'off'}", file=sys.stderr)
            continue
        if text == "/reset":
            history = []
            print("conversation reset", file=sys.stderr)
            continue
        if not text:
            continue
        printer = _turn(args, send, text, thinking, history)
        if printer.finish is None or printer.finish.finish_reason == "error":
            continue  # (the printer said why); this turn is not kept
        history += [pb.ChatMessage(role="user", content=text),
                    pb.ChatMessage(role="assistant", content="".join(printer.content),
                                   reasoning_content="".join(printer.reasoning))]  # fmt: skip


def _chat_remote(args: argparse.Namespace, request: Any, printer: ChatPrinter) -> None:
    from cluster.gateway.client import ChatClientError, chat_remote

    try:
        chat_remote(args.target, request, printer, timeout=args.timeout, tls_ca=args.tls_ca)
    except ChatClientError as e:
        raise ServeError(str(e)) from None


async def _chat_local(engine: Engine, info: ServingInfo, request: Any, printer: ChatPrinter, strict: bool) -> None:
    from cluster.gateway import chat
    from cluster.gateway.client import print_async_stream
    from cluster.gateway.core import Gateway, GatewayError

    gateway = Gateway(engine, info, strict_output_format=strict)
    try:
        stream, translator = await chat.start_chat(gateway, request)
    except GatewayError as e:
        raise ServeError(e.message) from None
    await print_async_stream(chat.responses(gateway, stream, translator), printer)


def _check_answer(printer: ChatPrinter) -> None:
    """An answer that ended in an error (or without a final message) makes `dsv4 chat` fail."""
    finish = printer.finish
    if finish is None:
        raise ServeError("the answer ended without a final message")
    if finish.finish_reason == "error":
        raise ServeError(f"the answer ended in an error: {finish.error or 'unknown'}")
