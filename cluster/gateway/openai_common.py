"""What the OpenAI-compatible endpoints share: OpenAI's error JSON, sampling parameters,
logprobs, usage and server-sent events."""

from __future__ import annotations

import json
from typing import Any

import grpc

from cluster.gateway.core import GatewayError
from protos import load as load_protos

pb, _ = load_protos()

# gRPC status of a refusal -> (HTTP status, OpenAI error type)
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
}


class ApiError(Exception):
    """An answer in OpenAI's error format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    @classmethod
    def of(cls, e: GatewayError) -> ApiError:
        """The HTTP answer for a refusal of the gateway core; the parameter is the message's
        leading field name (`messages[0].role: ...`)."""
        status, kind = HTTP_STATUS.get(e.code, (500, "server_error"))
        head, sep, _ = e.message.partition(": ")
        param = head.removeprefix("sampling.") if sep and " " not in head else None  # OpenAI's names: flat
        return cls(status, e.message, param, kind)


def sampling_pb(*, max_tokens: int | None, temperature: float | None, top_p: float | None, top_k: int | None,
                min_p: float | None, seed: int | None, stop: str | list[str] | None, logprobs: int,
                ignore_eos: bool = False) -> Any:  # fmt: skip
    """OpenAI sampling parameters as a dsv4.v1.SamplingParams (unset: the server's defaults)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 16:
        raise ApiError(400, f"at most 16 stop strings, got {len(stops)}", "stop")
    return pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k or 0,
                             min_p=min_p or 0.0, seed=seed, stop=stops, logprobs=logprobs,
                             ignore_eos=ignore_eos)  # fmt: skip


def logprobs_json(logprobs: Any, top_n: int, tokenizer: Any) -> list[dict[str, Any]]:
    """pb TokenLogprobs as OpenAI's `logprobs.content` entries (`top_n` alternatives each)."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": tokenizer.decode([token_id]), "logprob": logprob,
                "bytes": list(tokenizer.token_bytes(token_id))}  # fmt: skip

    return [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t.token_id, t.logprob) for t in lp.top[:top_n]]}
            for lp in logprobs]  # fmt: skip


def usage_json(finishes: list[Any]) -> dict[str, Any]:
    """OpenAI usage over the choices' Finish messages (the prompt counted once)."""
    done = [f for f in finishes if f is not None]
    prompt = done[0].usage.prompt_tokens if done else 0
    completion = sum(f.usage.completion_tokens for f in done)
    cached = done[0].usage.cached_tokens if done else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
