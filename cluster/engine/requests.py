"""Request-level messages between the gateway and the engine: plain dataclasses, one module.

The gateway turns RPCs into `GenerateRequest`s and the engine streams `RequestOutput`s
back; refusals are the errors below (the gateway maps each to a status).
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.step import SamplingParams, TokenLogprob


class RequestError(ValueError):
    """A request that can never be served as asked; `field` names the culprit."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at its limit; retry later."""


class EngineUnavailableError(RuntimeError):
    """The engine (or a worker it needs) is down or draining."""


@dataclass(frozen=True)
class GenerateRequest:
    uid: str  # unique request id
    prompt_ids: tuple[int, ...]  # encoded prompt, BOS included
    sampling: SamplingParams = SamplingParams()


@dataclass(frozen=True)
class RequestOutput:
    """One streamed update for a request; the last one has `finish_reason` set."""

    uid: str
    token_ids: tuple[int, ...] = ()  # new tokens since the previous update
    text: str = ""  # new text (never past a stop string, never a partial character)
    logprobs: tuple[TokenLogprob, ...] = ()  # one per new token when asked for
    finish_reason: str | None = None  # None while running; stop | length | abort | error
    error: str | None = None  # why, when finish_reason == "error"
    unavailable: bool = False  # the workers holding the request were lost (gRPC UNAVAILABLE; retry)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    time_to_first_token_ms: float = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def validate_sampling(p: SamplingParams) -> None:
    """Raise RequestError naming the first bad field of `p`."""
    if p.max_tokens < 1:
        raise RequestError("sampling.max_tokens", f"must be >= 1, got {p.max_tokens}")
    if not p.temperature >= 0:
        raise RequestError("sampling.temperature", f"must be >= 0, got {p.temperature}")
    if not 0 < p.top_p <= 1:
        raise RequestError("sampling.top_p", f"must be in (0, 1], got {p.top_p}")
    if p.top_k < 0:
        raise RequestError("sampling.top_k", f"must be >= 0, got {p.top_k}")
    if not 0 <= p.min_p <= 1:
        raise RequestError("sampling.min_p", f"must be in [0, 1], got {p.min_p}")
    if not 0 <= p.logprobs <= 20:
        raise RequestError("sampling.logprobs", f"must be in [0, 20], got {p.logprobs}")
    if any(not s for s in p.stop):
        raise RequestError("sampling.stop", "stop strings must be non-empty")
