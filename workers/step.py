"""The step contract between the engine and the model worker: plain dataclasses, one module.

Each step the engine's scheduler hands the worker group a `StepPlan` and gets a
`StepResult`; a request prefilled on one instance reaches a decode instance as a
`Prefilled` message. The contract lives here, below both the engine that writes it
(cluster/engine/) and the worker that reads it (workers/worker.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float  # of the chosen token under the model's raw distribution
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) alternatives, best first


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


@dataclass(frozen=True)
class Prefilled:
    """A request prefilled by one instance and handed to another to decode (KV handoff):
    everything the decode instance needs to continue it exactly where it stopped."""

    uid: str
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]  # tokens sampled by the prefill instance (already streamed to the client)
    sampling: SamplingParams  # with its seed fixed, so decoding continues the same RNG stream
    cached_tokens: int  # prompt tokens the prefill instance took from its prefix cache
    ticket: Any  # the handoff carrier's ticket for the KV state (workers/handoff.py)
    t_submit: float  # time.monotonic() when the request arrived (for its time to first token)
    t_first: float | None = None  # time.monotonic() of its first token
