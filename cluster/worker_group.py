"""The in-process expert-parallel backend: W model workers in this process, each holding
E/W routed experts and its own requests (data-parallel attention), stepping in lockstep
on threads and exchanging tokens through the `local` communicator.

To the engine it looks like one worker: `execute(plan)` splits the plan by the rank that
owns each request, runs every rank (ranks with no tokens still join each collective) and
merges the results.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from cluster.messages import SeqWork, StepPlan, StepResult
from router.comm import CollectiveTimeoutError, LocalGroup
from router.placement import ExpertPlacement
from router.stats import LayerStats, merge
from workers.config import ModelConfig
from workers.cp import apply_context_parallel, split_chunk
from workers.ep import apply_expert_parallel
from workers.weights import load_model, serving_device
from workers.worker import ModelWorker


class LocalWorkerGroup:
    def __init__(
        self, checkpoint: str | Path, world_size: int, *, dtype: torch.dtype, simulate_quant: bool = True,
        progress: bool = False, step_timeout: float = 600.0, page_size: int = 128, device: str = "auto",
    ) -> None:  # fmt: skip
        self.group = LocalGroup(world_size, timeout=step_timeout)
        self.world_size = world_size
        self.workers: list[ModelWorker] = []
        cfg = ModelConfig.from_json(Path(checkpoint) / "config.json")
        placement = ExpertPlacement(cfg.n_routed_experts, world_size)
        dev = serving_device(device)
        for rank in range(world_size):
            model = load_model(checkpoint, dtype=dtype, simulate_quant=simulate_quant, progress=progress,
                               expert_ids=placement.local_experts(rank), resident_quant=dev.type == "cuda",
                               device=dev)  # fmt: skip
            apply_expert_parallel(model, placement, self.group.communicator(rank))
            apply_context_parallel(model, self.group.communicator(rank))
            self.workers.append(ModelWorker(model, lockstep=True, page_size=page_size))
        self.placement = placement
        self.owner: dict[str, int] = {}  # uid -> rank holding its state
        self.held: dict[str, int] = {}  # uid -> tokens in its state (placement by KV load)
        self.prefix_rank: dict[str, int] = {}  # cached prefix key -> rank keeping it
        self.page_size = page_size
        self.cp = ContextParallelPlan(world_size)

    @property
    def model(self):
        return self.workers[0].model

    def num_states(self) -> int:
        return sum(w.num_states() for w in self.workers)

    def routing_window(self) -> dict[int, LayerStats]:
        return merge(w.routing_window() for w in self.workers)

    def export(self, uid: str, timeout: float | None = None):
        """Hand a request's state over (from the rank that holds it; a copy in this process,
        so no `timeout`). Until it succeeds the rank keeps owning it, so the engine's release
        of a failed handoff (`StepPlan.finished`) still reaches that rank."""
        rank = self.owner[uid]
        state = self.workers[rank].export(uid)
        if self.cp.drop(uid):  # the other ranks' replicas of a context-parallel prefill
            for other, worker in enumerate(self.workers):
                if other != rank:
                    worker.release(uid)
        self.owner.pop(uid)
        self.held.pop(uid, None)
        return state

    def check_import(self, state) -> str | None:
        """Why a handed-off state cannot be imported here (every rank has the same pool layout)."""
        return self.workers[0].check_import(state)

    def execute(self, plan: StepPlan) -> StepResult:
        assign_owners(self.owner, plan, len(self.workers), self.held, self.page_size, self.prefix_rank)
        plans = split_plan(self.owner, plan, len(self.workers), self.prefix_rank, self.cp)
        for uid in plan.finished:
            self.owner.pop(uid, None)
        results: list[StepResult | None] = [None] * len(self.workers)
        errors: list[BaseException | None] = [None] * len(self.workers)

        def run(rank: int) -> None:
            try:
                results[rank] = self.workers[rank].execute(plans[rank])
            except BaseException as e:  # noqa: BLE001 - reported below, peers released
                errors[rank] = e
                self.group.abort()

        threads = [threading.Thread(target=run, args=(r,), name=f"ep-rank-{r}") for r in range(len(self.workers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = [e for e in errors if e is not None]
        if failed:  # report the cause, not the peers that timed out waiting for it
            self.group = _fresh_group(self)
            raise next((e for e in failed if not isinstance(e, CollectiveTimeoutError)), failed[0])
        return merge_results(results)


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


def _fresh_group(group: LocalWorkerGroup) -> LocalGroup:
    """After a failed step the old group is aborted: give every worker a new communicator."""
    fresh = LocalGroup(len(group.workers), timeout=group.group.timeout)
    for rank, worker in enumerate(group.workers):
        for blk in [*worker.model.layers, *worker.model.mtp]:
            blk.ffn.comm = fresh.communicator(rank)
            if blk.attn.cp is not None:
                blk.attn.cp.comm = fresh.communicator(rank)
    return fresh
