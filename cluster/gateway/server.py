"""The gRPC server: `dsv4.v1.Inference` over a `Gateway`, plus health and reflection.

`InferenceServicer` maps each RPC onto the module that implements it (chat.py: Chat and
Encode; generate.py: Generate; info.py: Abort, GetModelInfo, GetServerInfo, Drain);
`start_server` wires the services; `serve` runs a server until SIGINT/SIGTERM and drains.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.gateway import chat, generate, info
from cluster.gateway.core import SERVICE_NAME, EngineLike, Gateway, GatewayError, Limits, ServingInfo
from cluster.gateway.guard import Undecodable, inference_handler, refuse
from cluster.gateway.metrics import GatewayMetrics
from protos import load as load_protos

if TYPE_CHECKING:
    from cluster.assembly.manifest import GatewaySpec, TlsSpec

pb, pb_grpc = load_protos()
log = logging.getLogger("dsv4.gateway")


class InferenceServicer(pb_grpc.InferenceServicer):
    """grpc.aio handlers: an undecodable body -> INVALID_ARGUMENT, GatewayError -> its status
    (the message bounded), streams closed (and aborted) on every exit. `on_drain` runs
    after a Drain call (the server sets health NOT_SERVING there)."""

    def __init__(self, gateway: Gateway, on_drain: Callable[[], Awaitable[None]] | None = None) -> None:
        self.gateway, self.on_drain = gateway, on_drain

    async def Chat(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if _undecodable(request, context):
            return
        async for response in chat.chat_rpc(self.gateway, request, context):  # (grpc.aio wants an async generator)
            yield response

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if _undecodable(request, context):
            return
        async for response in generate.generate_rpc(self.gateway, request, context):
            yield response

    async def Encode(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if _undecodable(request, context):
            return None
        return await chat.encode_rpc(self.gateway, request, context)

    async def Abort(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if _undecodable(request, context):
            return None
        try:
            info.abort(self.gateway, request.request_id)
        except GatewayError as e:
            return refuse(context, e)
        return pb.AbortResponse()

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if _undecodable(request, context):
            return None
        return info.model_info(self.gateway)

    async def GetServerInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if _undecodable(request, context):
            return None
        return await asyncio.to_thread(info.server_info, self.gateway)  # (Ray reads can block)

    async def Drain(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if _undecodable(request, context):
            return None
        response = info.drain(self.gateway)
        if self.on_drain is not None:
            await self.on_drain()
        return response


def _undecodable(request: Any, context: grpc.aio.ServicerContext) -> bool:
    """True (the status set: INVALID_ARGUMENT) when the body did not decode."""
    if isinstance(request, Undecodable):
        refuse(context, GatewayError(grpc.StatusCode.INVALID_ARGUMENT, request.message))
        return True
    return False


@dataclass
class RunningServer:
    """A started grpc.aio server and the handles needed to drain it."""

    server: grpc.aio.Server
    port: int  # the bound port (the real one when asked for 0)
    health: Any  # grpc_health's aio HealthServicer
    gateway: Gateway

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)


async def start_server(
    gateway: Gateway, host: str = "127.0.0.1", port: int = 50051, tls: TlsSpec | None = None
) -> RunningServer:
    """Start Inference + health + reflection on host:port (TLS with `tls`'s certificate and
    key); health says SERVING once started. Bodies over gateway.max_request_bytes are
    refused by grpc itself (RESOURCE_EXHAUSTED). OSError when the port or the key files fail."""
    limit = gateway.limits.max_request_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit)])
    health_servicer = health.aio.HealthServicer()

    async def not_serving() -> None:
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    service = pb.DESCRIPTOR.services_by_name["Inference"]
    server.add_generic_rpc_handlers((inference_handler(service, InferenceServicer(gateway, not_serving)),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    try:
        address = f"{host}:{port}"
        bound = server.add_insecure_port(address) if tls is None else server.add_secure_port(address, _credentials(tls))
    except RuntimeError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e}") from None
    await server.start()
    running = RunningServer(server, bound, health_servicer, gateway)
    await running.set_serving(True)
    return running


def _credentials(tls: TlsSpec) -> grpc.ServerCredentials:
    """grpc's TLS credentials from the PEM files (OSError naming the file that cannot be read)."""
    pem = {}
    for what in ("cert", "key"):
        path = getattr(tls, what)
        try:
            pem[what] = Path(path).expanduser().read_bytes()
        except OSError as e:
            raise OSError(f"gateway.tls.{what}: cannot read {path}: {e.strerror}") from None
        if b"-----BEGIN" not in pem[what]:
            raise OSError(f"gateway.tls.{what}: {path} is not a PEM file")
    return grpc.ssl_server_credentials([(pem["key"], pem["cert"])])


async def serve(engine: EngineLike, serving: ServingInfo, spec: GatewaySpec) -> None:
    """Serve `engine` on `spec.host:spec.port` (and /metrics on `spec.metrics_port`) until
    SIGINT or SIGTERM, then drain: health NOT_SERVING, running requests finish. OSError
    when a port cannot be bound."""
    metrics = GatewayMetrics(engine.load, engine.routing_totals)
    limits = Limits(spec.max_request_bytes, spec.max_prompt_tokens)
    gateway = Gateway(engine, serving, metrics, spec.strict_output_format, limits)
    http = None
    try:
        metrics.serve(spec.metrics_port, spec.host)
        running = await start_server(gateway, spec.host, spec.port, spec.tls)
        if spec.http_port is not None:
            from cluster.gateway.http import start_http

            http, http_port = await start_http(gateway, spec.host, spec.http_port, spec.default_thinking)
            log.info("OpenAI-compatible HTTP API on http://%s:%d/v1", spec.host, http_port)
    except OSError:
        metrics.close()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("gateway listening on %s:%d (dsv4.v1.Inference, health, reflection%s)", spec.host, running.port,
             ", TLS" if spec.tls else "")  # fmt: skip
    log.info('ready: try `dsv4 chat --target %s:%d "Hello"`', spec.host, running.port)
    await stop.wait()
    log.info("draining: health NOT_SERVING, finishing running requests ...")
    gateway.draining = True
    await running.set_serving(False)
    await asyncio.to_thread(engine.stop, True)
    await running.server.stop(grace=2)
    if http is not None:
        http.should_exit = True
        await http.task
    metrics.close()
    log.info("stopped")
