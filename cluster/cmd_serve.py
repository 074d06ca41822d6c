"""`dsv4 serve` (the gRPC gateway over an in-process engine) and `dsv4 chat` (its client,
or `--local`: the same gateway code driven in this process, no server)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.manifest import Manifest, ManifestError, ModelSpec, load_manifest, parse_manifest
from workers.presets import PRESETS

if TYPE_CHECKING:
    from cluster.engine import Engine
    from cluster.gateway import ServingInfo
    from cluster.gateway_client import ChatPrinter
    from cluster.router_actor import InstanceRouter

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
    for key in ("host", "port", "metrics_port"):
        value = getattr(args, key, None)
        if value is not None:
            gateway = replace(gateway, **{key: value})
    try:
        return replace(manifest, gateway=parse_manifest({"gateway": gateway.__dict__}).gateway)
    except ManifestError as e:  # a bad flag value: name the flag
        flag = "--" + e.path.removeprefix("gateway.").replace("_", "-")
        raise ServeError(f"{flag}{str(e).removeprefix(e.path)}") from None


def check_topology(manifest: Manifest, checkpoint: Path) -> None:
    """Refuse, before anything starts, a topology the model cannot be split into or this
    build cannot serve; the message names the manifest key."""
    from workers.config import ModelConfig

    cfg = ModelConfig.from_json(Path(checkpoint) / "config.json")
    for pool in manifest.pools:
        path = manifest.pool_path(pool)
        if cfg.n_routed_experts % pool.workers:
            raise ManifestError(
                f"{path}.workers",
                f"{cfg.n_routed_experts} routed experts cannot be split evenly over {pool.workers} workers",
            )
        if manifest.communicator_of(pool) == "nccl":
            import torch

            if torch.cuda.device_count() < 1:
                raise ManifestError(f"{path}.communicator", "nccl needs GPUs; this machine has none")
    ratios = sorted({r for r in (cfg.compress_ratio(i) for i in range(cfg.num_hidden_layers)) if r})
    page = manifest.scheduler.page_size
    if any(page % r for r in ratios):
        raise ManifestError(
            "scheduler.page_size", f"must be a multiple of {max(ratios)} (the model's compress ratios), got {page}"
        )


def boot(manifest: Manifest) -> tuple[Engine | InstanceRouter, ServingInfo]:
    """Load the manifest's model into started engines: one per instance of the pool, behind
    the router when there are several."""
    from cluster.cmd_model import torch_dtype
    from cluster.engine import EngineConfig
    from cluster.gateway import ServingInfo
    from cluster.inprocess import build_engine
    from cluster.model_cache import ensure_preset_checkpoint
    from cluster.router_actor import DisaggRouter, InstanceRouter

    spec: ModelSpec = manifest.model
    if spec.checkpoint:
        checkpoint = Path(spec.checkpoint)
    else:  # a random model of the preset, written once to the cache directory
        checkpoint = ensure_preset_checkpoint(spec.preset or "tiny", spec.seed or 0)
    check_topology(manifest, checkpoint)
    sched = manifest.scheduler
    t0 = time.perf_counter()
    by_role: dict[str, list[Engine]] = {}
    for pool in manifest.pools:
        log.info("loading %s for pool %s (%s, backend %s, %d instance(s) of %d worker(s), %s communicator) ...",
                 checkpoint, pool.name, spec.dtype, manifest.backend, pool.instances, pool.workers,
                 manifest.communicator_of(pool))  # fmt: skip
        by_role[pool.role] = [build_engine(
            checkpoint,
            engine_config=EngineConfig(sched.max_batch_tokens, sched.max_running, sched.max_waiting,
                                       sched.max_model_len, sched.prefix_cache and pool.role != "decode",
                                       handoff_timeout_s=sched.handoff_timeout_s),  # fmt: skip
            dtype=torch_dtype(spec.dtype),  # None (auto): build_engine picks
            kv_cache_bytes=sched.kv_bytes,
            page_size=sched.page_size,
            simulate_quant=spec.simulate_quant,
            progress=sys.stderr.isatty(),
            workers=pool.workers,
            backend=manifest.backend,
            communicator=manifest.communicator_of(pool),
            ray_address=manifest.ray.address,
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus,
            resources=dict(pool.resources),
            placement=pool.placement,
            context_parallel_min_tokens=pool.context_parallel_min_tokens,
            device=spec.device,
            handoff_transport=manifest.handoff_transport,
        ) for _ in range(pool.instances)]  # fmt: skip
    names = {p.role: p.name for p in manifest.pools}
    if "prefill" in by_role:
        engine = DisaggRouter(by_role["prefill"], by_role["decode"], (names["prefill"], names["decode"]),
                              on_failure=sched.handoff_failure)  # fmt: skip
    elif len(by_role["colocated"]) > 1:
        engine = InstanceRouter(by_role["colocated"], names["colocated"])
    else:
        engine = by_role["colocated"][0]
    log.info("engine up in %.1fs (max context %d tokens)", time.perf_counter() - t0, engine.config.max_model_len)
    info = ServingInfo(engine.model_config, str(checkpoint), spec.dtype, manifest.backend, engine.page_size)
    return engine, info


# -- serve -----------------------------------------------------------------------------------
def serve_main(args: argparse.Namespace) -> None:
    manifest = resolve_manifest(args)
    engine, info = boot(manifest)
    try:
        asyncio.run(_serve(engine, info, manifest))
    finally:
        engine.stop(drain=False, timeout=5)


async def _serve(engine: Engine, info: ServingInfo, manifest: Manifest) -> None:
    from cluster.gateway import Gateway, start_server
    from cluster.metrics import GatewayMetrics

    spec = manifest.gateway
    metrics = GatewayMetrics(engine.load, engine.routing_totals)
    gateway = Gateway(engine, info, metrics)
    try:
        metrics.serve(spec.metrics_port, spec.host)
        running = await start_server(gateway, spec.host, spec.port)
    except OSError as e:
        metrics.close()
        raise ServeError(str(e)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("gateway listening on %s:%d (dsv4.v1.Inference, health, reflection)", spec.host, running.port)
    log.info('ready: try `dsv4 chat --target %s:%d "Hello"`', spec.host, running.port)
    await stop.wait()
    log.info("draining: health NOT_SERVING, finishing running requests ...")
    gateway.draining = True
    await running.set_serving(False)
    await asyncio.to_thread(engine.stop, True)
    await running.server.stop(grace=2)
    metrics.close()
    log.info("stopped")


# -- chat ------------------------------------------------------------------------------------
def chat_main(args: argparse.Namespace) -> None:
    from cluster.gateway_client import ChatClientError, ChatPrinter, chat_remote, chat_request

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
        return
    manifest = resolve_manifest(args)
    engine, info = boot(manifest)
    try:
        asyncio.run(_chat_local(engine, info, request, printer))
    finally:
        engine.stop(drain=False, timeout=5)


async def _chat_local(engine: Engine, info: ServingInfo, request: Any, printer: ChatPrinter) -> None:
    from cluster.gateway import Gateway, GatewayError
    from cluster.gateway_client import print_async_stream

    gateway = Gateway(engine, info)
    try:
        stream, translator = gateway.start_chat(request)
    except GatewayError as e:
        raise ServeError(e.message) from None
    await print_async_stream(gateway.chat(stream, translator), printer)
