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
from typing import Any

from cluster.engine.prefix_cache import PrefixIndex, page_keys
from workers.handoff import discard
from workers.kv_cache import KVCacheManager
from workers.step import SamplingParams, SeqWork, StepPlan


@dataclass
class SchedRequest:
    """The scheduler's view of one request."""

    uid: str
    prompt: list[int]
    sampling: SamplingParams
    output: list[int] = field(default_factory=list)  # sampled tokens
    computed: int = 0  # tokens already in the model state
    num_preemptions: int = 0
    cached: int = 0  # prompt tokens taken from the prefix cache at the last admission
    page_keys: list[str] = field(default_factory=list)  # prefix keys of its full pages so far
    snaps: list[str] = field(default_factory=list)  # prefixes this request kept (the latest ones)
    prompt_snap: str | None = None  # the one at the prompt's last page boundary (kept longer)
    imported: Any = None  # a state handed over by a prefill instance (workers.kv_pool.SeqExport)
    context_parallel: bool = False  # its prefill chunks run split over the instance's ranks (replicas on each)

    def keys_upto(self, num_tokens: int, page_size: int) -> list[str]:
        """Its page keys covering at least the first `num_tokens` tokens' full pages."""
        have = len(self.page_keys) * page_size
        if num_tokens // page_size > len(self.page_keys):
            self.page_keys = page_keys(self.token_slice(have, num_tokens), page_size, self.page_keys)
        return self.page_keys

    @property
    def tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def token_slice(self, start: int, end: int) -> tuple[int, ...]:
        n = len(self.prompt)
        if end <= n:
            return tuple(self.prompt[start:end])
        return tuple(self.prompt[start:n] if start < n else ()) + tuple(self.output[max(start - n, 0) : end - n])


class Scheduler:
    def __init__(
        self, kv: KVCacheManager, max_batch_tokens: int, max_running: int, prefix_cache: bool = False,
        cp_ranks: int = 1, cp_min_tokens: int = 0,
    ) -> None:  # fmt: skip
        """`cp_ranks` > 1 and `cp_min_tokens` > 0: a new prompt of at least `cp_min_tokens`
        (no cached prefix, not handed over) is prefilled context-parallel over the ranks;
        its pages count `cp_ranks` times until its prefill ends (every rank holds a replica)."""
        self.kv = kv
        self.cp_ranks, self.cp_min_tokens = cp_ranks, cp_min_tokens
        self.prefix = PrefixIndex(kv) if prefix_cache else None
        self._snapshots: dict[str, str] = {}  # uid -> key, for the plan being built
        self._imports: dict[str, Any] = {}  # uid -> handed-over state, for the plan being built
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
                if req.imported is not None:  # its handed-off state will not be fetched: its holder may free it
                    discard(req.imported)
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
                n = self._chunk(req, budget)
                if self._grow(req.uid, req.computed + n):
                    work.append(self._work(req, n))
                    budget -= n
        while budget > 0 and self.waiting and len(self.running) < self.max_running:
            req = self.waiting[0]
            hit = None
            if self.prefix is not None and req.imported is None:
                hit = self.prefix.lookup(req.keys_upto(req.tokens, self.kv.page_size), req.tokens)
            self._plan_context_parallel(req, hit)
            while not self.kv.can_grow(req.uid, req.tokens + 1):  # whole prompt must fit to start
                if self.prefix is None or not self.prefix.evict_one():
                    break
            if not self.kv.can_grow(req.uid, req.tokens + 1):
                break
            self.waiting.popleft()
            self.running.append(req)
            self._new_in_worker.add(req.uid)
            if req.imported is not None:  # its state arrives with the plan (`cached` came with it)
                req.computed, self._imports[req.uid], req.imported = req.imported.num_tokens, req.imported, None
            else:
                req.computed, req.cached = (hit[1], hit[1]) if hit else (0, 0)
            n = self._chunk(req, budget)
            self.kv.grow(req.uid, req.computed + n)
            work.append(self._work(req, n, prefix=hit[0] if hit else None))
            budget -= n
        return self._plan(work)

    def _plan_context_parallel(self, req: SchedRequest, hit) -> None:
        """Decide at admission whether `req` prefills context-parallel (and charge its replicas)."""
        n = len(req.prompt)
        req.context_parallel = (
            self.cp_ranks > 1 and 0 < self.cp_min_tokens <= n and hit is None and req.imported is None
            and self.kv.pages_for(n + 1) * self.cp_ranks <= self.kv.num_pages  # the replicas fit at all
        )  # fmt: skip
        self.kv.set_copies(req.uid, self.cp_ranks if req.context_parallel else 1)

    def _chunk(self, req: SchedRequest, budget: int) -> int:
        """Tokens of `req` to run now: what is left, within the budget; with the prefix cache,
        a prefill chunk that crosses a page boundary ends on it (so its state can be kept)."""
        n = min(req.tokens - req.computed, budget)
        if self.prefix is not None and n > 1:
            boundary = (req.computed + n) // self.kv.page_size * self.kv.page_size
            if req.computed < boundary < req.computed + n:
                n = boundary - req.computed
        return n

    def _work(self, req: SchedRequest, n: int, prefix: str | None = None) -> SeqWork:
        start = req.computed
        req.computed += n
        if self.prefix is not None and req.computed % self.kv.page_size == 0:
            self._keep(req)
        split = req.context_parallel and n >= self.cp_ranks
        if req.context_parallel and not split:  # its owner goes on alone: the other ranks drop their
            req.context_parallel = False  # replicas first thing in this step, before anything grows
            self.kv.set_copies(req.uid, 1)
        return SeqWork(req.uid, req.token_slice(start, start + n), start, req.computed == req.tokens, prefix,
                       context_parallel=split)  # fmt: skip

    def _keep(self, req: SchedRequest) -> None:
        """Ask the worker to keep `req`'s state after this step (it ends on a page boundary).
        A request keeps its latest prefix and the one at its prompt's last page boundary."""
        page = self.kv.page_size
        key = req.keys_upto(req.computed, page)[req.computed // page - 1]
        if key in self.prefix or not self.prefix.add(key, req.computed):
            return
        self._snapshots[req.uid] = key
        for old in req.snaps:
            if old != req.prompt_snap and old not in self.prefix.pinned:
                self.prefix.remove(old)
        req.snaps = [k for k in (req.prompt_snap, key) if k is not None]
        if req.computed == len(req.prompt) // page * page:
            req.prompt_snap = key

    def _plan(self, work: list[SeqWork]) -> StepPlan:
        new = {w.uid for w in work if w.uid in self._new_in_worker}
        self._new_in_worker -= new
        by_uid = {r.uid: r for r in self.running}
        snapshots = {u: k for u, k in self._snapshots.items() if u not in self._to_release}
        for uid, key in self._snapshots.items():
            if uid not in snapshots:  # preempted in this very step: nothing to keep
                self.prefix.remove(key)
        plan = StepPlan(
            work=tuple(work),
            finished=tuple(self._to_release),
            sampling={uid: by_uid[uid].sampling for uid in new},
            num_generated={w.uid: len(by_uid[w.uid].output) for w in work},
            snapshots=snapshots,
            evict=self.prefix.take_plan_changes() if self.prefix is not None else (),
            imports={u: x for u, x in self._imports.items() if u in {w.uid for w in work}},  # (after `finished`)
        )
        self._to_release, self._snapshots, self._imports = [], {}, {}
        return plan

    def _grow(self, uid: str, num_tokens: int) -> bool:
        """Grow `uid`, evicting cached prefixes (least recently used first) if that makes room."""
        while not self.kv.grow(uid, num_tokens):
            if self.prefix is None or not self.prefix.evict_one():
                return False
        return True

    def _grow_or_preempt(self, req: SchedRequest, num_tokens: int) -> bool:
        while not self._grow(req.uid, num_tokens):
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
