"""How one instance's `StepPlan` is split over its ranks (both backends use it).

Each request's state lives on one rank, its owner: a new request goes to the rank that
keeps its cached prefix, else to the least loaded one (`assign_owners`). Every step the
plan is split into one plan per rank (`split_plan`, possibly empty: a rank with no tokens
still joins each collective), and the ranks' results are merged (`merge_results`). A long
prefill chunk the scheduler marks `context_parallel` is split over every rank instead
(`ContextParallelPlan`, workers/cp.py).
"""

from __future__ import annotations

from workers.cp import split_chunk
from workers.step import SeqWork, StepPlan, StepResult


def assign_owners(
    owner: dict[str, int], plan: StepPlan, world_size: int, held: dict[str, int], page: int,
    prefix_rank: dict[str, int] | None = None,
) -> None:  # fmt: skip
    """A request seen for the first time goes to the rank holding its cached prefix, else to
    the least loaded rank: the fewest KV pages held (`held`: uid -> tokens in its state, kept
    up to date here), then the fewest requests."""
    prefix_rank = prefix_rank if prefix_rank is not None else {}
    pages, count = [0] * world_size, [0] * world_size
    for uid, rank in owner.items():
        pages[rank] += -(-held.get(uid, 0) // page)
        count[rank] += 1
    for w in plan.work:
        end = w.pos0 + len(w.token_ids)
        if w.uid not in owner and w.prefix is not None:  # its cached prefix lives on one rank
            rank = prefix_rank[w.prefix]
            owner[w.uid] = rank
            pages[rank] += -(-end // page)
            count[rank] += 1
        elif w.uid not in owner:
            rank = min(range(world_size), key=lambda r: (pages[r], count[r], r))
            owner[w.uid] = rank
            pages[rank] += -(-end // page)
            count[rank] += 1
        held[w.uid] = end
    for uid in plan.finished:
        held.pop(uid, None)


class ContextParallelPlan:
    """Splits the chunks the scheduler marks `context_parallel` over every rank
    (workers/cp.py) and tracks which requests' states every rank holds a replica of.

    The scheduler marks a new request's prefill chunks (it decides, and charges the
    replicas to the KV budget); the first unmarked work of a replicated request (a short
    chunk, decode) runs on its owner alone, and the other ranks drop their replicas then,
    or when it finishes or is exported."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.replicated: set[str] = set()  # uids whose state every rank holds
        self.chunks = 0  # chunks run context-parallel so far

    def parts(self, w: SeqWork, plan: StepPlan) -> list[SeqWork] | None:
        """Rank r's part of `w` at index r, or None when `w` runs on its owner alone."""
        n = len(w.token_ids)
        if not w.context_parallel or self.world_size < 2:
            return None
        fresh = w.pos0 == 0 and w.prefix is None and w.uid not in plan.imports
        if n < self.world_size or not (fresh or w.uid in self.replicated):
            raise ValueError(f"{w.uid}: a context-parallel chunk needs a new state or replicas on every rank, "
                             f"and a token per rank ({n} tokens at {w.pos0}, {self.world_size} ranks)")  # fmt: skip
        self.replicated.add(w.uid)
        self.chunks += 1
        end = w.pos0 + n
        return [SeqWork(w.uid, w.token_ids[a - w.pos0 : b - w.pos0], a, w.sample and b == end, chunk=(w.pos0, end))
                for a, b in split_chunk(w.pos0, end, self.world_size)]  # fmt: skip

    def drop(self, uid: str) -> bool:
        """Forget `uid`'s replicas; True if the non-owner ranks hold one to release."""
        if uid in self.replicated:
            self.replicated.discard(uid)
            return True
        return False


def split_plan(
    owner: dict[str, int], plan: StepPlan, world_size: int, prefix_rank: dict[str, int] | None = None,
    cp: ContextParallelPlan | None = None,
) -> list[StepPlan]:
    """One plan per rank with that rank's requests (possibly empty: the rank still steps);
    prefixes are kept on, and evicted from, the rank of their request (`prefix_rank`).
    With `cp`, a long prefill chunk is split over every rank (each gets its part, the
    request's sampling parameters and its replica's release)."""
    prefix_rank = prefix_rank if prefix_rank is not None else {}
    cp = cp if cp is not None else ContextParallelPlan(world_size)
    evict = {key: prefix_rank.pop(key, -1) for key in plan.evict}
    for uid, key in plan.snapshots.items():
        prefix_rank[key] = owner[uid]
    work: list[list[SeqWork]] = [[] for _ in range(world_size)]
    everywhere: set[str] = set()  # uids every rank hears of this step (their parts, params, releases)
    release: set[str] = set()  # uids whose replicas the non-owner ranks drop now
    for w in plan.work:
        parts = cp.parts(w, plan)
        if parts is None:
            if cp.drop(w.uid):
                release.add(w.uid)
            work[owner[w.uid]].append(w)
            continue
        everywhere.add(w.uid)
        for rank, part in enumerate(parts):
            work[rank].append(part)
    release |= {u for u in plan.finished if cp.drop(u)}
    per_rank = []
    for rank in range(world_size):
        mine = {uid for uid, r in owner.items() if r == rank} | everywhere
        per_rank.append(StepPlan(
            work=tuple(work[rank]),
            finished=tuple(u for u in plan.finished if u in mine or u in release)
            + tuple(u for u in release if u not in plan.finished and owner.get(u) != rank),
            sampling={u: p for u, p in plan.sampling.items() if u in mine},
            num_generated={u: n for u, n in plan.num_generated.items() if u in mine},
            snapshots={u: k for u, k in plan.snapshots.items() if owner.get(u) == rank},
            imports={u: x for u, x in plan.imports.items() if u in mine},
            exports=frozenset(u for u in plan.exports if owner.get(u) == rank),
            evict=tuple(k for k, r in evict.items() if r == rank),
        ))  # fmt: skip
    return per_rank


def merge_results(results: list[StepResult]) -> StepResult:
    tokens, logprobs, failed = {}, {}, {}
    for r in results:
        tokens.update(r.tokens)
        logprobs.update(r.logprobs)
        failed.update(r.failed)
    return StepResult(tokens=tokens, logprobs=logprobs, failed=failed)
