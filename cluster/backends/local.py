"""The in-process backend: W model workers in this process, each holding E/W routed
experts and its own requests (data-parallel attention), stepping in lockstep on threads
and exchanging tokens through the `local` communicator. One worker (W = 1) holds every
expert and runs in the engine's thread.

To the engine it looks like one worker (`cluster.backends.group.WorkerGroup`):
`execute(plan)` splits the plan by the rank that owns each request, runs every rank
(ranks with no tokens still join each collective) and merges the results.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from cluster.backends.plan import ContextParallelPlan, assign_owners, merge_results, split_plan
from cluster.backends.ranks import build_rank_worker
from router.comm import CollectiveTimeoutError, LocalGroup
from router.stats import LayerStats, merge
from workers.config import ModelConfig
from workers.step import StepPlan, StepResult
from workers.worker import ModelWorker


class LocalWorkerGroup:
    """`workers` step together over `group` (their communicators' group; one worker needs none)."""

    def __init__(self, workers: list[ModelWorker], group: LocalGroup | None = None) -> None:
        self.workers = workers
        self.world_size = len(workers)
        self.group = group if group is not None else LocalGroup(self.world_size)
        self.owner: dict[str, int] = {}  # uid -> rank holding its state
        self.held: dict[str, int] = {}  # uid -> tokens in its state (placement by KV load)
        self.prefix_rank: dict[str, int] = {}  # cached prefix key -> rank keeping it
        self.page_size = workers[0].model.kv.page_size
        self.cp = ContextParallelPlan(self.world_size)

    @classmethod
    def load(
        cls, checkpoint: str | Path, world_size: int, *, dtype: torch.dtype, simulate_quant: bool = True,
        progress: bool = False, step_timeout: float = 600.0, page_size: int = 128, device: str = "auto",
    ) -> LocalWorkerGroup:  # fmt: skip
        """Load `world_size` ranks of `checkpoint` (expert-parallel when more than one)."""
        group = LocalGroup(world_size, timeout=step_timeout)

        def communicator(rank: int):
            return None if world_size == 1 else lambda: group.communicator(rank)

        workers = [build_rank_worker(checkpoint, rank, world_size, communicator(rank), dtype=dtype,
                                     simulate_quant=simulate_quant, progress=progress, page_size=page_size,
                                     device=device) for rank in range(world_size)]  # fmt: skip
        return cls(workers, group)

    @property
    def model(self):
        """Rank 0's model (every rank has the same config and pool layout)."""
        return self.workers[0].model

    @property
    def model_config(self) -> ModelConfig:
        return self.workers[0].model.cfg

    state = "serving"  # threads of this process: never lost on their own

    def nodes(self) -> list[str]:
        return ["local"] * self.world_size

    def check(self) -> None:
        """Nothing can die apart from this process."""

    def stop(self) -> None:
        """Nothing to free: the workers go with this object."""

    def num_states(self) -> int:
        return sum(w.num_states() for w in self.workers)

    def routing_window(self) -> dict[int, LayerStats]:
        return merge(w.routing_window() for w in self.workers)

    def export(self, uid: str, timeout: float | None = None):
        """Hand a request's state over (from the rank that holds it; a copy in this process,
        so no `timeout`). Until it succeeds the rank keeps owning it, so the engine's release
        of a failed handoff (`StepPlan.finished`) still reaches that rank."""
        if self.world_size == 1:
            return self.workers[0].export(uid)
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
        if self.world_size == 1:  # one worker: no owners to track, no threads
            return self.workers[0].execute(plan)
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


def _fresh_group(group: LocalWorkerGroup) -> LocalGroup:
    """After a failed step the old group is aborted: give every worker a new communicator."""
    fresh = LocalGroup(len(group.workers), timeout=group.group.timeout)
    for rank, worker in enumerate(group.workers):
        for blk in [*worker.model.layers, *worker.model.mtp]:
            blk.ffn.comm = fresh.communicator(rank)
            if blk.attn.cp is not None:
                blk.attn.cp.comm = fresh.communicator(rank)
    return fresh
