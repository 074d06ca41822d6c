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
import ctypes
import ctypes.util
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Protocol, TypeVar

import grpc

from cluster.engine.requests import (
    EngineUnavailableError,
    GenerateRequest,
    QueueFullError,
    RequestError,
    RequestOutput,
)
from cluster.gateway.guard import bounded, refuse
from cluster.gateway.metrics import GatewayMetrics
from protos import load as load_protos
from workers import faults
from workers.config import ModelConfig
from workers.step import SamplingParams

pb, _ = load_protos()
log = logging.getLogger("dsv4.gateway")

T = TypeVar("T")
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024  # grpc's own default receive limit
TOKENIZER_THREADS = 2
_TRIM_AFTER_BYTES = 256 * 1024  # after a prompt this big, hand freed memory back
_TRIM_FOR_S = 5.0  # ... every second, until none has come for this long
try:
    _libc: Any = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _libc.malloc_trim  # noqa: B018 (glibc only)
except (OSError, AttributeError):
    _libc = None

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
    """A request the gateway refuses, with the gRPC status to answer it with (the message
    cut to a length any client can read)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        message = bounded(message)
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


@dataclass(frozen=True)
class Limits:
    """How big a request may be (the manifest's gateway.max_request_bytes and
    gateway.max_prompt_tokens; None: the model's context)."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_prompt_tokens: int | None = None


async def stream_out(context: Any, uid: str, responses: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """`responses` on their way to the client (fault point `gateway.stream`). A failure on
    the way (a bug, a fault) ends the RPC INTERNAL, saying so, and closes `responses`,
    which aborts the request."""
    async with aclosing(responses) as out:
        try:
            async for response in out:
                faults.hit("gateway.stream")
                yield response
        except Exception as e:
            log.exception("%s: the response stream failed", uid)
            refuse(context, GatewayError(grpc.StatusCode.INTERNAL, f"the response stream failed: {e}"))


class Gateway:
    """The Inference API over one engine, independent of the transport.

    Rendering and tokenizing a prompt run on a small thread pool (`offload`), never on the
    event loop: a multi-MB prompt must not hold up Health or the requests beside it.
    """

    def __init__(self, engine: EngineLike, info: ServingInfo, metrics: GatewayMetrics | None = None,
                 strict_output_format: bool = False, limits: Limits = Limits()) -> None:  # fmt: skip
        self.engine, self.info, self.limits = engine, info, limits
        self.metrics = metrics or GatewayMetrics(engine.load)
        self.strict_output_format = strict_output_format  # output that breaks the chat format ends in an error
        self.draining = False
        self.started = time.monotonic()
        self._pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="dsv4-tokenize")
        self._trimmer: asyncio.TimerHandle | None = None
        self._last_big = 0.0

    async def offload(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the tokenizing pool. After a big input (`size` bytes) the heap is
        trimmed every second until none has come for `_TRIM_FOR_S`: glibc keeps freed
        memory otherwise (a 2 MB prompt left ~180 MB of RSS behind)."""
        loop = asyncio.get_running_loop()
        if size >= _TRIM_AFTER_BYTES:
            self._last_big = time.monotonic()
            if self._trimmer is None:
                self._trimmer = loop.call_later(1.0, self._trim)
        return await loop.run_in_executor(self._pool, fn, *args)

    def _trim(self) -> None:
        self._trimmer = None
        self._pool.submit(trim_heap)
        if time.monotonic() - self._last_big < _TRIM_FOR_S:
            self._trimmer = asyncio.get_running_loop().call_later(1.0, self._trim)

    def check_size(self, request: Any) -> None:
        """RESOURCE_EXHAUSTED for a request (a protobuf message) over max_request_bytes."""
        size, limit = request.ByteSize(), self.limits.max_request_bytes
        if size > limit:
            raise GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the request is {size} bytes; this server takes at most {limit} "
                               "(gateway.max_request_bytes)")  # fmt: skip

    # -- submitting -------------------------------------------------------------------------
    def submit(self, uid: str, prompt_ids: tuple[int, ...], params: SamplingParams) -> RequestStream:
        """Queue a request on the engine; GatewayError if it is refused. Call from the event
        loop, with `uid` checked (`guard.check_request_id`, before the prompt is tokenized)."""
        if self.draining:
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, "server is draining")
        stream = RequestStream(self, uid or uuid.uuid4().hex, asyncio.get_running_loop())
        try:
            self.engine.submit(GenerateRequest(stream.uid, prompt_ids, params), stream.sink)
        except (RequestError, QueueFullError, EngineUnavailableError) as e:
            raise as_gateway_error(e) from None
        except Exception as e:  # a bug or a fault in placement: nothing was admitted
            log.exception("%s: placing the request failed", stream.uid)
            why = f"placing the request failed: {type(e).__name__}: {e}"
            raise GatewayError(grpc.StatusCode.INTERNAL, why) from None
        self.metrics.on_submit(len(prompt_ids))
        return stream

    def max_len(self) -> int:
        """The longest prompt + completion the engine takes."""
        return int(self.engine.config.max_model_len)

    def check_prompt(self, prompt_len: int, field: str) -> None:
        """RequestError naming `field` (where the prompt came from) for a prompt longer than
        the context (less one token to generate) or than gateway.max_prompt_tokens."""
        context, most = self.max_len(), self.limits.max_prompt_tokens
        if most is not None and most < context - 1 and prompt_len > most:
            raise RequestError(field, f"the prompt is {prompt_len} tokens; this server takes at most {most} "
                                      "(gateway.max_prompt_tokens)")  # fmt: skip
        if prompt_len >= context:
            raise RequestError(field, f"the prompt is {prompt_len} tokens; the maximum context is {context} tokens")


def trim_heap() -> None:
    """Give the freed heap back to the OS (glibc). (Refused requests are freed when refused:
    see guard.refuse.)"""
    if _libc is not None:
        _libc.malloc_trim(0)
