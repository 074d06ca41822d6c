"""The gRPC gateway: `dsv4.v1.Inference` over an engine, plus health and reflection.

`Gateway` is the transport-free core (the local CLI drives it directly): it validates
requests, submits them and turns the engine's outputs into response messages.
`InferenceServicer` maps it onto grpc.aio and `start_server` wires the services.

Thread model: the engine calls each request's sink from its loop thread; the sink hands
the output to the asyncio loop with `call_soon_threadsafe`. Closing a stream (client
cancel, deadline, or the end of the handler) aborts its request in the engine.
Errors: bad input -> INVALID_ARGUMENT naming the field, a full queue -> RESOURCE_EXHAUSTED,
a down or draining engine -> UNAVAILABLE. A request that fails in the engine, or whose
output breaks the chat format, ends with a Finish whose finish_reason is "error".
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.gateway_chat import ChatInput, ChatTranslator, finish_pb, logprobs_pb, to_sampling
from cluster.messages import (
    EngineUnavailableError,
    GenerateRequest,
    QueueFullError,
    RequestError,
    RequestOutput,
    SamplingParams,
)
from cluster.metrics import GatewayMetrics
from encoding import VOCAB_SIZE
from protos import load as load_protos
from workers.config import ModelConfig

pb, pb_grpc = load_protos()
log = logging.getLogger("dsv4.gateway")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # dsv4.v1.Inference
REQUEST_ID_METADATA = "x-request-id"


class EngineLike(Protocol):
    """What the gateway needs of an engine (cluster.engine.Engine, or a test double)."""

    tokenizer: Any  # encode(str) -> list[int], detokenizing is the engine's job
    vocab_size: int
    eos_id: int
    config: Any  # .max_model_len

    def submit(self, request: GenerateRequest, sink: Callable[[RequestOutput], None]) -> None: ...
    def abort(self, uid: str) -> bool: ...
    def load(self) -> dict[str, int]: ...


def _package_version() -> str:
    try:
        return metadata.version("dsv4")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


@dataclass(frozen=True)
class ServingInfo:
    """What GetModelInfo / GetServerInfo report besides the engine's live load."""

    model: ModelConfig
    checkpoint: str
    dtype: str  # bfloat16 | float32
    backend: str = "inprocess"
    page_size: int = 0  # tokens per KV page
    version: str = field(default_factory=_package_version)


class GatewayError(Exception):
    """A request the gateway refuses, with the gRPC status to answer it with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _as_gateway_error(e: ValueError | QueueFullError | EngineUnavailableError) -> GatewayError:
    """The status for an exception from validation or `engine.submit`."""
    if isinstance(e, QueueFullError):
        return GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded: {e}")
    if isinstance(e, EngineUnavailableError):
        return GatewayError(grpc.StatusCode.UNAVAILABLE, str(e))
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(e))  # RequestError, encoding errors


class RequestStream:
    """One submitted request: the engine's outputs, in order, as an async iterator.

    `close()` aborts the request in the engine unless it already finished; it is safe to
    call more than once and from any exit path.
    """

    def __init__(self, gateway: Gateway, uid: str, loop: asyncio.AbstractEventLoop) -> None:
        self.uid, self._gateway, self._loop = uid, gateway, loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._last_token_time: float | None = None
        self.finished = False
        self.lost: str | None = None  # set when the engine lost the workers holding this request

    def sink(self, out: RequestOutput) -> None:
        """Called from the engine thread."""
        now = time.monotonic()
        since_last = None if self._last_token_time is None else now - self._last_token_time
        self._gateway.metrics.observe(out, self._last_token_time is None, since_last)
        if out.token_ids:
            self._last_token_time = now
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, out)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            out = await self._queue.get()
            self.finished = out.finished
            if out.unavailable:
                self.lost = out.error or "the workers holding this request were lost"
            yield out

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._gateway.engine.abort(self.uid)


class Gateway:
    """The Inference API over one engine, independent of the transport."""

    def __init__(self, engine: EngineLike, info: ServingInfo, metrics: GatewayMetrics | None = None) -> None:
        self.engine, self.info = engine, info
        self.metrics = metrics or GatewayMetrics(engine.load)
        self.draining = False
        self.started = time.monotonic()

    # -- submitting -------------------------------------------------------------------------
    def submit(self, uid: str, prompt_ids: tuple[int, ...], params: SamplingParams) -> RequestStream:
        """Queue a request on the engine; GatewayError if it is refused. Call from the event loop."""
        if self.draining:
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, "server is draining")
        stream = RequestStream(self, uid or uuid.uuid4().hex, asyncio.get_running_loop())
        try:
            self.engine.submit(GenerateRequest(stream.uid, prompt_ids, params), stream.sink)
        except (RequestError, QueueFullError, EngineUnavailableError) as e:
            raise _as_gateway_error(e) from None
        self.metrics.on_submit(len(prompt_ids))
        return stream

    def encode(self, request: Any) -> ChatInput:
        try:
            return ChatInput.from_request(request, self.engine.tokenizer)
        except ValueError as e:
            raise _as_gateway_error(e) from None

    def start_chat(self, request: Any) -> tuple[RequestStream, ChatTranslator]:
        """Validate, encode and submit a ChatRequest."""
        chat = self.encode(request)
        try:
            params = to_sampling(request.sampling, len(chat.prompt_ids), self._max_len(), self.engine.vocab_size)
        except RequestError as e:
            raise _as_gateway_error(e) from None
        stream = self.submit(request.request_id, chat.prompt_ids, params)
        return stream, ChatTranslator(stream.uid, chat.thinking_mode, self.engine.eos_id)

    def start_generate(self, request: Any) -> RequestStream:
        """Validate and submit a GenerateRequest."""
        try:
            ids = self._generate_prompt(request)
            params = to_sampling(request.sampling, len(ids), self._max_len(), self.engine.vocab_size)
        except ValueError as e:
            raise _as_gateway_error(e) from None
        return self.submit(request.request_id, ids, params)

    def _generate_prompt(self, request: Any) -> tuple[int, ...]:
        if request.token_ids and request.text:
            raise RequestError("token_ids", "give the prompt as token_ids or as text, not both")
        if request.text:
            return tuple(self.engine.tokenizer.encode(request.text))
        if not request.token_ids:
            raise RequestError("token_ids", "the prompt is empty: give token_ids or text")
        vocab = self.engine.vocab_size
        bad = next((i for i, t in enumerate(request.token_ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(
                f"token_ids[{bad}]", f"token id {request.token_ids[bad]} is outside the vocabulary [0, {vocab})"
            )
        return tuple(request.token_ids)

    def _max_len(self) -> int:
        return int(self.engine.config.max_model_len)

    # -- streams ----------------------------------------------------------------------------
    async def chat(self, stream: RequestStream, translator: ChatTranslator) -> AsyncIterator[Any]:
        """ChatResponse messages until the Finish; aborts the request on malformed output."""
        try:
            async for out in stream:
                for response in translator.push(out):
                    yield response
                if translator.failed:
                    return
        finally:
            stream.close()

    async def generate(self, stream: RequestStream) -> AsyncIterator[Any]:
        """GenerateResponse messages until the Finish."""
        try:
            async for out in stream:
                if out.token_ids or out.text:
                    chunk = pb.GenerateChunk(token_ids=out.token_ids, text=out.text, logprobs=logprobs_pb(out.logprobs))
                    yield pb.GenerateResponse(chunk=chunk)
                if out.finished:
                    yield pb.GenerateResponse(finish=finish_pb(stream.uid, out))
        finally:
            stream.close()

    # -- unary ------------------------------------------------------------------------------
    def abort(self, request_id: str) -> None:
        if not request_id or not self.engine.abort(request_id):
            raise GatewayError(
                grpc.StatusCode.INVALID_ARGUMENT, f"request_id: no running or waiting request {request_id!r}"
            )

    def model_info(self) -> Any:
        cfg = self.info.model
        return pb.ModelInfo(
            architecture=(cfg.extra.get("architectures") or ["DeepseekV4ForCausalLM"])[0],
            checkpoint=self.info.checkpoint,
            dtype=self.info.dtype,
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            head_dim=cfg.head_dim,
            num_routed_experts=cfg.n_routed_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            num_shared_experts=cfg.n_shared_experts,
            vocab_size=cfg.vocab_size,
            max_context=self._max_len(),
            tokenizer_path=str(getattr(self.engine.tokenizer, "path", "")),
            tokenizer_vocab_size=VOCAB_SIZE,
        )

    def load(self, raw: dict[str, int] | None = None) -> Any:
        """The engine's load (or `raw`, a load dict) as a Load message."""
        raw = self.engine.load() if raw is None else raw
        return pb.Load(
            running=raw.get("running", 0),
            waiting=raw.get("waiting", 0),
            kv_pages_used=raw.get("kv_pages_used", 0),
            kv_pages_free=raw.get("kv_pages_free", 0),
            kv_pages_total=raw.get("kv_pages_total", 0),
            page_size=self.info.page_size,
            kv_pages_cached=raw.get("kv_pages_cached", 0),
            prefix_hits=raw.get("prefix_hits", 0),
            prefix_lookups=raw.get("prefix_lookups", 0),
        )

    def server_info(self) -> Any:
        load = self.load()
        return pb.ServerInfo(
            expert_balance=self._expert_balance(),
            backend=self.info.backend,
            version=self.info.version,
            draining=self.draining,
            uptime_s=time.monotonic() - self.started,
            load=load,
            pools=self._pools(),
            totals=_totals(self.metrics),
        )

    def _pools(self) -> list[Any]:
        """One PoolInfo per pool: its instances' summed load and where their workers run."""
        pools = getattr(self.engine, "pools", None)
        groups = pools() if pools is not None else [("colocated", "colocated", [self.engine])]
        out = []
        for name, role, engines in groups:
            loads = [e.load() for e in engines]
            summed = {k: sum(d.get(k, 0) for d in loads) for k in loads[0]} if loads else {}
            out.append(pb.PoolInfo(name=name, role=role, num_instances=len(engines), load=self.load(summed),
                                   workers=self._workers(engines)))  # fmt: skip
        return out

    @staticmethod
    def _workers(engines: list[Any]) -> list[Any]:
        out = []
        for i, engine in enumerate(engines):
            nodes = getattr(engine, "worker_nodes", None)
            try:
                ranks = nodes() if nodes is not None else []
            except Exception:  # an info call must not fail because a worker is being rebuilt
                log.exception("reading the workers' nodes failed")
                ranks = []
            out += [pb.WorkerInfo(instance=i, rank=r, node=node) for r, node in enumerate(ranks)]
        return out

    def _expert_balance(self) -> list[Any]:
        totals = getattr(self.engine, "routing_totals", None)
        if totals is None:
            return []
        try:
            stats = totals()
        except Exception:  # an info call must not fail because a worker is being rebuilt
            log.exception("reading the routing stats failed")
            return []
        return [pb.LayerBalance(layer=layer, balancedness=st.balancedness, tokens=int(st.tokens_per_expert.sum()))
                for layer, st in stats.items() if st.num_tokens]  # fmt: skip

    def drain(self) -> Any:
        """Stop admitting new requests; the running and waiting ones finish."""
        was_draining, self.draining = self.draining, True
        if not was_draining:
            log.info("draining: new requests get UNAVAILABLE; running requests finish")
        return pb.DrainResponse(was_draining=was_draining, load=self.load())


def _totals(metrics: GatewayMetrics) -> Any:
    """The gateway's Prometheus counters as a Totals message."""
    reg = metrics.registry
    finished = sum(s.value for m in metrics.requests.collect() for s in m.samples if s.name.endswith("_total"))
    return pb.Totals(
        requests_finished=int(finished),
        prompt_tokens=int(reg.get_sample_value("dsv4_prompt_tokens_total") or 0),
        completion_tokens=int(reg.get_sample_value("dsv4_generation_tokens_total") or 0),
    )


class InferenceServicer(pb_grpc.InferenceServicer):
    """grpc.aio handlers: GatewayError -> status, streams closed (and aborted) on every exit.
    `on_drain` runs after a Drain call (the server sets health NOT_SERVING there)."""

    def __init__(self, gateway: Gateway, on_drain: Callable[[], Awaitable[None]] | None = None) -> None:
        self.gateway, self.on_drain = gateway, on_drain

    async def Chat(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            stream, translator = self.gateway.start_chat(request)
        except GatewayError as e:
            await context.abort(e.code, e.message)
        context.add_done_callback(lambda _: stream.close())
        await context.send_initial_metadata(((REQUEST_ID_METADATA, stream.uid),))
        async for response in self.gateway.chat(stream, translator):
            yield response
        if stream.lost:  # after the final message, the status says: retry elsewhere
            await context.abort(grpc.StatusCode.UNAVAILABLE, stream.lost)

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            stream = self.gateway.start_generate(request)
        except GatewayError as e:
            await context.abort(e.code, e.message)
        context.add_done_callback(lambda _: stream.close())
        await context.send_initial_metadata(((REQUEST_ID_METADATA, stream.uid),))
        async for response in self.gateway.generate(stream):
            yield response
        if stream.lost:
            await context.abort(grpc.StatusCode.UNAVAILABLE, stream.lost)

    async def Encode(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            chat = self.gateway.encode(request)
        except GatewayError as e:
            await context.abort(e.code, e.message)
        return pb.EncodeResponse(prompt=chat.prompt, token_ids=chat.prompt_ids)

    async def Abort(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self.gateway.abort(request.request_id)
        except GatewayError as e:
            await context.abort(e.code, e.message)
        return pb.AbortResponse()

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.gateway.model_info()

    async def GetServerInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.gateway.server_info()

    async def Drain(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        response = self.gateway.drain()
        if self.on_drain is not None:
            await self.on_drain()
        return response


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


async def start_server(gateway: Gateway, host: str = "127.0.0.1", port: int = 50051) -> RunningServer:
    """Start Inference + health + reflection on host:port; health says SERVING once started."""
    server = grpc.aio.server()
    health_servicer = health.aio.HealthServicer()

    async def not_serving() -> None:
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    pb_grpc.add_InferenceServicer_to_server(InferenceServicer(gateway, not_serving), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e}") from None
    await server.start()
    running = RunningServer(server, bound, health_servicer, gateway)
    await running.set_serving(True)
    return running
