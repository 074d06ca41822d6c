"""The interface between an engine and the workers of its instance: a `WorkerGroup`.

Both backends implement it (`cluster.backends.local.LocalWorkerGroup`: W model workers
on threads of this process; `cluster.backends.ray_group.RayWorkerGroup`: W Ray actors
in one placement group). To the engine a group looks like one worker: one `StepPlan` in,
one `StepResult` out per step, whatever the number of ranks behind it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from router.stats import LayerStats
from workers.config import ModelConfig
from workers.step import StepPlan, StepResult

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class GroupSpec:
    """What a backend needs to start one instance's workers (the assembly fills it in from
    the manifest's model, pool, scheduler and ray sections)."""

    checkpoint: Path
    workers: int  # ranks: expert-parallel workers, E/workers routed experts each
    dtype: torch.dtype  # compute dtype
    simulate_quant: bool = True  # the official FP8/FP4 QAT rounding
    device: str = "auto"  # auto: each worker's GPU if it sees one, else the CPU
    page_size: int = 128  # raw tokens per KV page
    progress: bool = False  # progress bars while loading weights
    communicator: str = "local"  # local (threads) | gloo | nccl (Ray actors)
    num_cpus: float = 1.0  # per Ray worker
    num_gpus: float = 0.0  # per Ray worker
    resources: tuple[tuple[str, float], ...] = ()  # custom Ray resources per worker
    placement: str = "spread"  # Ray workers over nodes: spread | pack
    ray_address: str | None = None  # the Ray cluster to join (None: start one)
    handoff_transport: str = "object_store"  # Ray workers: object_store | collective


class WorkerGroup(Protocol):
    world_size: int  # ranks of the instance (expert-parallel workers)
    state: str  # serving | rebuilding (a rank was lost; new ranks are starting) | down (a rebuild failed)

    @property
    def model_config(self) -> ModelConfig:
        """The served model's config (the driver needs no model to read it)."""
        ...

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step on every rank (split by the rank that owns each request)."""
        ...

    def export(self, uid: str, timeout: float | None = None) -> Any:
        """Hand a request's state over: the handoff carrier's ticket (workers/handoff.py)."""
        ...

    def check_import(self, ticket: Any) -> str | None:
        """Why a handed-off state cannot be imported here, or None."""
        ...

    def num_states(self) -> int:
        """Request states held over all ranks."""
        ...

    def check(self) -> None:
        """Ask every rank whether it is alive (the engine does, while idle): a lost rank is
        rebuilt, then EngineUnavailableError says every state is gone. A group that is
        `down` tries its rebuild again here."""
        ...

    def routing_window(self) -> dict[int, LayerStats]:
        """Per-layer routing stats since the last call, summed over the ranks."""
        ...

    def nodes(self) -> list[str]:
        """Where each rank runs: a Ray node address, or "local"."""
        ...

    def stop(self) -> None:
        """Free the ranks (actors, placement group); later steps fail."""
        ...
