"""The gateway's transport-free core: a `Gateway` over an engine (or the pool router)
that admits requests and streams the engine's outputs back, shared by every RPC
(cluster/gateway/chat.py, generate.py, info.py) and by `dsv4 chat --local`.

Thread model: the engine calls each request's sink from its loop thread; the sink hands
the output to the asyncio loop with `call_soon_threadsafe`. Closing a stream (client
cancel, deadline, or the end of the handler) aborts its request in the engine.
Errors: bad input -> INVALID_ARGUMENT naming the field, a full queue -> RESOURCE_EXHAUSTED,
a down or draining engine -> UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Protocol

import grpc

from cluster.engine.requests import (
    EngineUnavailableError,
    GenerateRequest,
    QueueFullError,
    RequestError,
    RequestOutput,
)
from cluster.gateway.metrics import GatewayMetrics
from protos import load as load_protos
from workers.config import ModelConfig
from workers.step import SamplingParams

pb, _ = load_protos()

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
    name: str = "dsv4"  # the served model's name (the HTTP API's `model`)


class GatewayError(Exception):
    """A request the gateway refuses, with the gRPC status to answer it with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def as_gateway_error(e: ValueError | QueueFullError | EngineUnavailableError) -> GatewayError:
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

    def __init__(self, engine: EngineLike, info: ServingInfo, metrics: GatewayMetrics | None = None,
                 strict_output_format: bool = False) -> None:  # fmt: skip
        self.engine, self.info = engine, info
        self.metrics = metrics or GatewayMetrics(engine.load)
        self.strict_output_format = strict_output_format  # output that breaks the chat format ends in an error
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
            raise as_gateway_error(e) from None
        self.metrics.on_submit(len(prompt_ids))
        return stream

    def max_len(self) -> int:
        """The longest prompt + completion the engine takes."""
        return int(self.engine.config.max_model_len)
