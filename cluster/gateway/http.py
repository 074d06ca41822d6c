"""The OpenAI-compatible HTTP API, beside gRPC on the same gateway core (FastAPI on uvicorn,
in the gRPC server's event loop):

    POST /v1/chat/completions   cluster/gateway/openai_chat.py
    POST /v1/completions        a text (or token ids) prompt, streamed or not
    GET  /v1/models             the served model
    GET  /health                200, or 503 while draining
    GET  /metrics               the gateway's Prometheus metrics

Errors are OpenAI's error JSON: 400 naming the parameter, 404 for another model, 413 for a
body over gateway.max_request_bytes, 429 when the queue is full, 503 while draining. A
client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict

from cluster.gateway import generate, openai_chat
from cluster.gateway.core import Gateway, GatewayError, RequestStream
from cluster.gateway.openai_common import ApiError, sampling_pb, sse, usage_json
from protos import load as load_protos

pb, _ = load_protos()
log = logging.getLogger("dsv4.http")


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | list[int]
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = 16  # OpenAI's default for completions
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None
    echo: bool = False


def build_app(gateway: Gateway, default_thinking: bool = False) -> FastAPI:
    """The HTTP API over `gateway`; the served model's name is `gateway.info.name`."""
    app = FastAPI(title="dsv4", description="OpenAI-compatible API of a DeepSeek-V4 server", docs_url=None,
                  redoc_url=None)  # fmt: skip
    model = gateway.info.name

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return JSONResponse(ApiError(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param).body(),
                            status_code=400)  # fmt: skip

    @app.middleware("http")
    async def bounded_body(request: Request, call_next: Any) -> Response:
        """413 for a body declared over gateway.max_request_bytes, before it is read."""
        length, limit = request.headers.get("content-length", ""), gateway.limits.max_request_bytes
        if length.isdigit() and int(length) > limit:
            error = ApiError(413, f"the request body is {length} bytes; this server takes at most {limit} "
                             "(gateway.max_request_bytes)")  # fmt: skip
            return JSONResponse(error.body(), status_code=413)
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name not in (None, "", model):
            raise ApiError(404, f"the model {name[:100]!r} does not exist; this server serves {model!r}", "model",
                           "not_found_error", "model_not_found")  # fmt: skip

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: openai_chat.ChatCompletionRequest, request: Request) -> Response:
        check_model(req.model)
        try:
            started = await openai_chat.start(gateway, req, default_thinking)
        except GatewayError as e:
            raise ApiError.of(e) from None
        streams = [s for s, _ in started]
        if req.stream:
            events = openai_chat.stream_events(gateway, req, started, model)
            return StreamingResponse(_closing(events, streams), media_type="text/event-stream")
        return JSONResponse(await _unless_gone(request, openai_chat.complete(gateway, req, started, model), streams))

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Response:
        check_model(req.model)
        if req.n != 1 or req.echo:
            raise ApiError(400, "n > 1 and echo are not supported by /v1/completions", "n" if req.n != 1 else "echo")
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise ApiError(400, f"logprobs must be in [0, 20], got {req.logprobs}", "logprobs")
        text, ids = (req.prompt, []) if isinstance(req.prompt, str) else ("", req.prompt)
        sampling = sampling_pb(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                               top_k=req.top_k, min_p=req.min_p, seed=req.seed, stop=req.stop,
                               logprobs=max(req.logprobs, 1) if req.logprobs is not None else 0)  # fmt: skip
        try:
            prompt = pb.GenerateRequest(text=text, token_ids=ids, sampling=sampling)
            stream = await generate.start_generate(gateway, prompt)
        except GatewayError as e:
            raise ApiError.of(e) from None
        if req.stream:
            events = _completion_events(gateway, req, stream, model)
            return StreamingResponse(_closing(events, [stream]), media_type="text/event-stream")
        return JSONResponse(await _unless_gone(request, _completion(gateway, req, stream, model), [stream]))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": model, "object": "model", "created": int(time.time() - (time.monotonic() - gateway.started)),
            "owned_by": "dsv4", "root": gateway.info.checkpoint, "max_model_len": gateway.max_len(),
            "dtype": gateway.info.dtype,
        }]}  # fmt: skip

    @app.get("/health")
    async def health() -> JSONResponse:
        if gateway.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _closing(events: AsyncIterator[str], streams: list[RequestStream]) -> AsyncIterator[str]:
    """A streamed body whose requests are aborted however it ends (a client gone included)."""
    try:
        async for event in events:
            yield event
    finally:
        for stream in streams:
            stream.close()


async def _unless_gone(request: Request, body: Awaitable[dict[str, Any]], streams: list[RequestStream]) -> Any:
    """Await a whole response body; a client that disconnects meanwhile aborts its requests."""
    task = asyncio.ensure_future(body)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.1)
            if done:
                return task.result()
            if await request.is_disconnected():
                log.info("client gone: aborting %s", ", ".join(s.uid for s in streams))
                raise ApiError(499, "the client disconnected")
    finally:
        task.cancel()
        for stream in streams:
            stream.close()


def _completion_choice(gateway: Gateway, chunk: Any, top_n: int) -> dict[str, Any]:
    tok = gateway.engine.tokenizer
    choice: dict[str, Any] = {"index": 0, "text": chunk.text, "logprobs": None, "finish_reason": None}
    if chunk.logprobs:
        choice["logprobs"] = {
            "tokens": [tok.decode([lp.token_id]) for lp in chunk.logprobs],
            "token_logprobs": [lp.logprob for lp in chunk.logprobs],
            "top_logprobs": [{tok.decode([t.token_id]): t.logprob for t in lp.top[:top_n]} for lp in chunk.logprobs],
        }
    return choice


def _completion_head(stream: RequestStream, model: str) -> dict[str, Any]:
    return {"id": f"cmpl-{stream.uid}", "object": "text_completion", "created": int(time.time()), "model": model}


async def _completion_events(gateway: Gateway, req: CompletionRequest, stream: RequestStream,
                             model: str) -> AsyncIterator[str]:  # fmt: skip
    head, finish = _completion_head(stream, model), None
    async for response in generate.responses(stream):
        if response.WhichOneof("kind") == "chunk":
            yield sse({**head, "choices": [_completion_choice(gateway, response.chunk, req.logprobs or 0)]})
        else:
            finish = response.finish
            done = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish.finish_reason}
            yield sse({**head, "choices": [done]})
            if finish.error:
                yield sse({"error": {"message": finish.error, "type": "server_error", "param": None, "code": None}})
    if (req.stream_options or {}).get("include_usage"):
        yield sse({**head, "choices": [], "usage": usage_json([finish])})
    yield "data: [DONE]\n\n"


async def _completion(gateway: Gateway, req: CompletionRequest, stream: RequestStream, model: str) -> dict[str, Any]:
    text, finish, logprobs = [], None, {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    async for response in generate.responses(stream):
        if response.WhichOneof("kind") == "chunk":
            choice = _completion_choice(gateway, response.chunk, req.logprobs or 0)
            text.append(choice["text"])
            for key, values in (choice["logprobs"] or {}).items():
                logprobs[key] += values
        else:
            finish = response.finish
    if finish is None or finish.finish_reason == "error":
        raise ApiError(503 if stream.lost else 500, finish.error if finish else "no answer", None, "server_error")
    choice = {"index": 0, "text": "".join(text), "finish_reason": finish.finish_reason,
              "logprobs": logprobs if req.logprobs is not None else None}  # fmt: skip
    return {**_completion_head(stream, model), "choices": [choice], "usage": usage_json([finish])}


class _Server(uvicorn.Server):
    """uvicorn in an event loop it does not own: the owner handles SIGINT / SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def start_http(gateway: Gateway, host: str, port: int, default_thinking: bool = False) -> tuple[_Server, int]:
    """Start the HTTP API on host:port in this event loop; (the server, the bound port)."""
    config = uvicorn.Config(build_app(gateway, default_thinking), host=host, port=port, log_level="warning",
                            lifespan="off", access_log=False)  # fmt: skip
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():  # it could not bind (uvicorn logs why and exits)
            raise OSError(f"cannot serve HTTP on {host}:{port}")
        await asyncio.sleep(0.01)
    server.task = task  # type: ignore[attr-defined]
    return server, server.servers[0].sockets[0].getsockname()[1]
