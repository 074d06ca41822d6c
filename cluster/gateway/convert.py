"""Conversions between the engine's messages and the API's protobuf messages, shared by
the streaming RPCs (Chat, Generate)."""

from __future__ import annotations

from typing import Any

from cluster.engine.requests import RequestError, RequestOutput, validate_sampling
from protos import load as load_protos
from workers.step import SamplingParams, TokenLogprob

pb, _ = load_protos()

DEFAULT_MAX_TOKENS = 256


def to_sampling(p: Any, prompt_len: int, max_model_len: int, vocab_size: int) -> SamplingParams:
    """A pb SamplingParams with server defaults filled in, validated (RequestError); the
    prompt's length was checked (`Gateway.check_prompt`)."""
    bad_stop = next((t for t in p.stop_token_ids if not 0 <= t < vocab_size), None)
    if bad_stop is not None:
        raise RequestError(
            "sampling.stop_token_ids", f"token id {bad_stop} is outside the vocabulary [0, {vocab_size})"
        )
    params = SamplingParams(
        max_tokens=p.max_tokens if p.HasField("max_tokens") else min(DEFAULT_MAX_TOKENS, max_model_len - prompt_len),
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k,
        min_p=p.min_p,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs,
    )
    validate_sampling(params)
    return params


def logprobs_pb(logprobs: tuple[TokenLogprob, ...]) -> list[Any]:
    return [
        pb.TokenLogprob(
            token_id=lp.token_id, logprob=lp.logprob, top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]
        )
        for lp in logprobs
    ]


def finish_pb(uid: str, out: RequestOutput, reason: str | None = None, error: str | None = None) -> Any:
    """The closing Finish message; `reason`/`error` override the engine's."""
    usage = pb.Usage(
        prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens, cached_tokens=out.cached_tokens
    )
    return pb.Finish(
        finish_reason=reason or out.finish_reason or "",
        usage=usage,
        time_to_first_token_ms=out.time_to_first_token_ms,
        error=error if error is not None else out.error or "",
        request_id=uid,
    )
