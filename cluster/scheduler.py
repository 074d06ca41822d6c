"""Continuous batching: which tokens of which requests run in the next step.

Per step, under a token budget: running requests that decode get their one token first,
then prefill chunks (requests mid-prompt, then newly admitted ones). Chunks may stop
anywhere (the model's state carries compressors' open blocks). KV pages are grown
before a chunk runs; when a decode cannot grow, the newest running request is preempted
and later recomputed from its tokens (same seed and counter -> same tokens).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cluster.messages import SamplingParams, SeqWork, StepPlan
from workers.kv_cache import KVCacheManager


@dataclass
class SchedRequest:
    """The scheduler's view of one request."""

    uid: str
    prompt: list[int]
    sampling: SamplingParams
    output: list[int] = field(default_factory=list)  # sampled tokens
    computed: int = 0  # tokens already in the model state
    num_preemptions: int = 0

    @property
    def tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def token_slice(self, start: int, end: int) -> tuple[int, ...]:
        n = len(self.prompt)
        if end <= n:
            return tuple(self.prompt[start:end])
        return tuple(self.prompt[start:n] if start < n else ()) + tuple(self.output[max(start - n, 0) : end - n])


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_batch_tokens: int, max_running: int) -> None:
        self.kv = kv
        self.max_batch_tokens, self.max_running = max_batch_tokens, max_running
        self.waiting: deque[SchedRequest] = deque()
        self.running: list[SchedRequest] = []  # admission order
        self._to_release: list[str] = []  # worker state to drop in the next plan
        self._new_in_worker: set[str] = set()  # uids whose worker state starts in the next plan

    # -- membership ---------------------------------------------------------------------
    def add(self, req: SchedRequest) -> None:
        self.waiting.append(req)

    def remove(self, uid: str) -> SchedRequest | None:
        """Forget a request (finished, aborted or failed) and free its pages."""
        for req in self.running:
            if req.uid == uid:
                self.running.remove(req)
                self.kv.free(uid)
                self._to_release.append(uid)
                return req
        for req in self.waiting:
            if req.uid == uid:
                self.waiting.remove(req)
                return req
        return None

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._to_release)

    # -- planning -------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        budget = self.max_batch_tokens
        work: list[SeqWork] = []
        for req in list(self.running):  # decodes first
            if req in self.running and req.tokens - req.computed == 1 and budget > 0:
                if self._grow_or_preempt(req, req.computed + 1):
                    work.append(self._work(req, 1))
                    budget -= 1
        for req in list(self.running):  # unfinished prompts
            if budget > 0 and req.tokens - req.computed > 1:
                n = min(req.tokens - req.computed, budget)
                if self.kv.grow(req.uid, req.computed + n):
                    work.append(self._work(req, n))
                    budget -= n
        while budget > 0 and self.waiting and len(self.running) < self.max_running:
            req = self.waiting[0]
            if not self.kv.can_grow(req.uid, req.tokens + 1):  # whole prompt must fit to start
                break
            self.waiting.popleft()
            self.running.append(req)
            self._new_in_worker.add(req.uid)
            n = min(req.tokens, budget)
            self.kv.grow(req.uid, n)
            work.append(self._work(req, n))
            budget -= n
        return self._plan(work)

    def _work(self, req: SchedRequest, n: int) -> SeqWork:
        start = req.computed
        req.computed += n
        return SeqWork(req.uid, req.token_slice(start, start + n), start, sample=req.computed == req.tokens)

    def _plan(self, work: list[SeqWork]) -> StepPlan:
        new = {w.uid for w in work if w.uid in self._new_in_worker}
        self._new_in_worker -= new
        by_uid = {r.uid: r for r in self.running}
        plan = StepPlan(
            work=tuple(work),
            finished=tuple(self._to_release),
            sampling={uid: by_uid[uid].sampling for uid in new},
            num_generated={w.uid: len(by_uid[w.uid].output) for w in work},
        )
        self._to_release = []
        return plan

    def _grow_or_preempt(self, req: SchedRequest, num_tokens: int) -> bool:
        while not self.kv.grow(req.uid, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: SchedRequest) -> None:
        """Recompute later: drop state and pages, keep the tokens, go to the front of the queue."""
        self.running.remove(req)
        self.kv.free(req.uid)
        self._to_release.append(req.uid)
        self._new_in_worker.discard(req.uid)
        req.computed = 0
        req.num_preemptions += 1
        self.waiting.appendleft(req)
