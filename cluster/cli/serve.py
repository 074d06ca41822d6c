"""`dsv4 serve`: the gateway (gRPC, and the OpenAI-compatible HTTP API when asked) over the
manifest's engines; the manifest with the command line's overrides (`dsv4 chat` uses it too)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import asdict, replace
from typing import TYPE_CHECKING

from cluster.assembly.manifest import Manifest, ManifestError, load_manifest, parse_manifest
from workers.presets import PRESETS

if TYPE_CHECKING:
    pass

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
    add_model_flags(p)
    p.set_defaults(func=serve_main)


def add_model_flags(p: argparse.ArgumentParser, local_only: bool = False) -> None:
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
        return replace(manifest, gateway=parse_manifest({"gateway": asdict(gateway)}).gateway)
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
