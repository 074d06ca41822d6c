"""The Generate RPC: token ids (or text) in, token ids and text out, streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from cluster.engine.requests import RequestError
from cluster.gateway.convert import finish_pb, logprobs_pb, to_sampling
from cluster.gateway.core import (
    REQUEST_ID_METADATA,
    Gateway,
    GatewayError,
    RequestStream,
    as_gateway_error,
    stream_out,
)
from cluster.gateway.guard import check_request_id, refuse
from protos import load as load_protos

pb, _ = load_protos()


async def start_generate(gateway: Gateway, request: Any) -> RequestStream:
    """Validate and submit a GenerateRequest (GatewayError if it is refused); a text prompt
    is tokenized off the event loop."""
    gateway.check_size(request)
    try:
        check_request_id(request.request_id)
        ids = await _prompt(gateway, request)
        gateway.check_prompt(len(ids), "text" if request.text else "token_ids")
        params = to_sampling(request.sampling, len(ids), gateway.max_len(), gateway.engine.vocab_size)
    except ValueError as e:
        raise as_gateway_error(e) from None
    return gateway.submit(request.request_id, ids, params)


async def _prompt(gateway: Gateway, request: Any) -> tuple[int, ...]:
    if request.token_ids and request.text:
        raise RequestError("token_ids", "give the prompt as token_ids or as text, not both")
    if request.text:
        return tuple(await gateway.offload(len(request.text), gateway.engine.tokenizer.encode, request.text))
    if not request.token_ids:
        raise RequestError("token_ids", "the prompt is empty: give token_ids or text")
    vocab = gateway.engine.vocab_size
    bad = next((i for i, t in enumerate(request.token_ids) if not 0 <= t < vocab), None)
    if bad is not None:
        raise RequestError(
            f"token_ids[{bad}]", f"token id {request.token_ids[bad]} is outside the vocabulary [0, {vocab})"
        )
    return tuple(request.token_ids)


async def responses(stream: RequestStream) -> AsyncIterator[Any]:
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


async def generate_rpc(gateway: Gateway, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """Generate: the stream of GenerateResponses; UNAVAILABLE after the final message when
    the request's workers were lost."""
    try:
        stream = await start_generate(gateway, request)
    except GatewayError as e:
        refuse(context, e)
        return
    context.add_done_callback(lambda _: stream.close())
    await context.send_initial_metadata(((REQUEST_ID_METADATA, stream.uid),))
    async for response in stream_out(context, stream.uid, responses(stream)):
        yield response
    if stream.lost:
        await context.abort(grpc.StatusCode.UNAVAILABLE, stream.lost)
