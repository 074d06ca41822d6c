"""Messages between the gateway, the engine and the workers: plain dataclasses, one module.

The gateway turns RPCs into `GenerateRequest`s; the engine streams `RequestOutput`s
back; each step the scheduler hands the worker a `StepPlan` and gets a `StepResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
class SamplingParams:
    max_tokens: int = 256  # completion tokens at most
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    min_p: float = 0.0  # drop tokens below min_p * p(most likely); 0 = off
    seed: int | None = None  # same seed -> same tokens, whatever else is in the batch
    stop: tuple[str, ...] = ()  # stop strings; the text stops before them
    stop_token_ids: tuple[int, ...] = ()  # besides EOS
    ignore_eos: bool = False
    logprobs: int = 0  # top-n alternatives per token (the chosen one's logprob always comes when > 0)

    def validate(self) -> None:
        """Raise RequestError naming the first bad field."""
        if self.max_tokens < 1:
            raise RequestError("sampling.max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise RequestError("sampling.temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError("sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError("sampling.top_k", f"must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise RequestError("sampling.min_p", f"must be in [0, 1], got {self.min_p}")
        if not 0 <= self.logprobs <= 20:
            raise RequestError("sampling.logprobs", f"must be in [0, 20], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise RequestError("sampling.stop", "stop strings must be non-empty")


@dataclass(frozen=True)
class GenerateRequest:
    uid: str  # unique request id
    prompt_ids: tuple[int, ...]  # encoded prompt, BOS included
    sampling: SamplingParams = SamplingParams()


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float  # of the chosen token under the model's raw distribution
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) alternatives, best first


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


@dataclass(frozen=True)
class SeqWork:
    """One request's slice of a step: feed `token_ids` at positions pos0..; sample after
    them if `sample` (the chunk reaches the end of the known tokens)."""

    uid: str
    token_ids: tuple[int, ...]
    pos0: int
    sample: bool
    prefix: str | None = None  # a new request's state starts from this cached prefix (pos0 tokens)
    context_parallel: bool = False  # split this prefill chunk over every rank of the instance (workers/cp.py)
    chunk: tuple[int, int] | None = None  # context parallel: this is one rank's part of positions [a, b)


@dataclass(frozen=True)
class StepPlan:
    """What the worker runs this step. A plan is a diff: state for uids it has not seen is
    created, `finished` uids' state is dropped."""

    work: tuple[SeqWork, ...]
    finished: tuple[str, ...] = ()
    sampling: dict[str, SamplingParams] = field(default_factory=dict)  # uid -> params, for new uids
    num_generated: dict[str, int] = field(default_factory=dict)  # uid -> tokens sampled so far (RNG counter)
    snapshots: dict[str, str] = field(default_factory=dict)  # uid -> prefix key: keep its state after this step
    evict: tuple[str, ...] = ()  # prefix keys to forget (before this step runs)
    imports: dict[str, Any] = field(default_factory=dict)  # uid -> handed-off state's ticket (workers/handoff.py)
    exports: frozenset[str] = frozenset()  # uids whose state is handed off after this step: ship it layer by layer


@dataclass(frozen=True)
class StepResult:
    tokens: dict[str, int]  # uid -> sampled token (only for work with sample=True)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)  # uid -> logprob info when asked
    failed: dict[str, str] = field(default_factory=dict)  # uid -> why its handed-off state could not be imported
