"""`dsv4 serve` (the gRPC gateway over an in-process engine) and `dsv4 chat` (its client,
or `--local`: the same gateway code driven in this process, no server)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from cluster.assembly.manifest import Manifest, ManifestError, load_manifest, parse_manifest
from workers.presets import PRESETS

if TYPE_CHECKING:
    from cluster.engine.engine import Engine
    from cluster.gateway.client import ChatPrinter
    from cluster.gateway.core import ServingInfo

log = logging.getLogger("dsv4.serve")

DEFAULT_TARGET = "127.0.0.1:50051"


class ServeError(ValueError):
    """Bad serve/chat input or an unreachable gateway; the CLI prints it and exits with 2."""


USER_ERRORS: tuple[type[Exception], ...] = (ServeError, ManifestError)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over gRPC (dsv4.v1.Inference, health, reflection)",
        description="Serve a model in this process over gRPC. Default: the tiny random model, "
        "created on first run in $DSV4_CACHE (default ~/.cache/dsv4), on 127.0.0.1:50051. "
        "Ctrl-C or SIGTERM drains running requests and exits.",
    )
    p.add_argument("-m", "--manifest", help="manifest YAML (see manifests/local-inprocess.yaml)")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port; 0 = any free port (default 50051)")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port; 0 = off (default off)")
    p.add_argument("--http-port", type=int,
                   help="also serve the OpenAI-compatible HTTP API (/v1/chat/completions, ...) here; 0 = any free "
                   "port (default: off)")  # fmt: skip
    _add_model_flags(p)
    p.set_defaults(func=serve_main)

    p = sub.add_parser(
        "chat",
        help="chat with a model: stream reasoning, content, tool calls and usage",
        description="Send one user message to a dsv4 gateway (or, with --local, to a model loaded here) "
        "and print the answer as it streams.",
    )
    p.add_argument("text", help="the user message")
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"gateway HOST:PORT (default {DEFAULT_TARGET})")
    p.add_argument("--local", action="store_true", help="load the model in this process instead of calling a server")
    p.add_argument("--thinking", action="store_true", help="thinking mode: reason first (printed apart)")
    p.add_argument("--max-tokens", type=int, help="completion tokens at most (default: the server's, 256)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default 1.0)")
    p.add_argument("--seed", type=int, help="sampling seed (default random)")
    p.add_argument("--system", help="a system message")
    p.add_argument("--timeout", type=float, help="seconds before the request is cancelled (remote only)")
    _add_model_flags(p, local_only=True)
    p.set_defaults(func=chat_main)


def _add_model_flags(p: argparse.ArgumentParser, local_only: bool = False) -> None:
    note = " (with --local)" if local_only else ""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--checkpoint", help=f"checkpoint directory to serve{note}")
    group.add_argument("--preset", choices=sorted(PRESETS), help=f"serve a random model of this shape{note}")


# -- model and engine ------------------------------------------------------------------------
def resolve_manifest(args: argparse.Namespace) -> Manifest:
    """The manifest (-m, or defaults) with the command line's overrides applied."""
    manifest = load_manifest(args.manifest) if getattr(args, "manifest", None) else parse_manifest(None)
    if args.checkpoint or args.preset:
        model = replace(manifest.model, checkpoint=args.checkpoint, preset=args.preset, seed=None)
        manifest = replace(manifest, model=model)
    gateway = manifest.gateway
    for key in ("host", "port", "metrics_port", "http_port"):
        value = getattr(args, key, None)
        if value is not None:
            gateway = replace(gateway, **{key: value})
    try:
        return replace(manifest, gateway=parse_manifest({"gateway": gateway.__dict__}).gateway)
    except ManifestError as e:  # a bad flag value: name the flag
        flag = "--" + e.path.removeprefix("gateway.").replace("_", "-")
        raise ServeError(f"{flag}{str(e).removeprefix(e.path)}") from None


# -- serve -----------------------------------------------------------------------------------
def serve_main(args: argparse.Namespace) -> None:
    from cluster.assembly.build import boot
    from cluster.gateway.server import serve

    manifest = resolve_manifest(args)
    engine, info = boot(manifest)
    try:
        asyncio.run(serve(engine, info, manifest.gateway))
    except OSError as e:  # a port that cannot be bound
        raise ServeError(str(e)) from None
    finally:
        engine.stop(drain=False, timeout=5)


# -- chat ------------------------------------------------------------------------------------
def chat_main(args: argparse.Namespace) -> None:
    from cluster.gateway.client import ChatClientError, ChatPrinter, chat_remote, chat_request

    request = chat_request(
        args.text, system=args.system, thinking=args.thinking, max_tokens=args.max_tokens,
        temperature=args.temperature, seed=args.seed,
    )  # fmt: skip
    printer = ChatPrinter()
    if not args.local:
        if args.checkpoint or args.preset:
            raise ServeError("--checkpoint and --preset choose the model of --local; a server serves its own")
        try:
            chat_remote(args.target, request, printer, timeout=args.timeout)
        except ChatClientError as e:
            raise ServeError(str(e)) from None
        _check_answer(printer)
        return
    from cluster.assembly.build import boot

    manifest = resolve_manifest(args)
    engine, info = boot(manifest)
    try:
        asyncio.run(_chat_local(engine, info, request, printer, manifest.gateway.strict_output_format))
    finally:
        engine.stop(drain=False, timeout=5)
    _check_answer(printer)


def _check_answer(printer: ChatPrinter) -> None:
    """An answer that ended in an error (or without a final message) makes `dsv4 chat` fail."""
    finish = printer.finish
    if finish is None:
        raise ServeError("the answer ended without a final message")
    if finish.finish_reason == "error":
        raise ServeError(f"the answer ended in an error: {finish.error or 'unknown'}")


async def _chat_local(engine: Engine, info: ServingInfo, request: Any, printer: ChatPrinter, strict: bool) -> None:
    from cluster.gateway import chat
    from cluster.gateway.client import print_async_stream
    from cluster.gateway.core import Gateway, GatewayError

    gateway = Gateway(engine, info, strict_output_format=strict)
    try:
        stream, translator = chat.start_chat(gateway, request)
    except GatewayError as e:
        raise ServeError(e.message) from None
    await print_async_stream(chat.responses(gateway, stream, translator), printer)
