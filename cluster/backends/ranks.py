"""Building one rank's model worker: the one place both backends load a worker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from router.comm import Communicator
from router.placement import ExpertPlacement
from workers.config import ModelConfig
from workers.cp import apply_context_parallel
from workers.ep import apply_expert_parallel
from workers.weights import load_model, serving_device
from workers.worker import ModelWorker


def build_rank_worker(
    checkpoint: str | Path, rank: int, world_size: int, communicator: Callable[[], Communicator] | None, *,
    dtype: torch.dtype, simulate_quant: bool = True, progress: bool = False, page_size: int = 128,
    device: str = "auto",
) -> ModelWorker:  # fmt: skip
    """Rank `rank` of `world_size` as a model worker on `device` (`auto`: its GPU if it
    sees one, with the FP8/FP4 weights resident for the kernels, else the CPU).

    With a `communicator` factory the rank holds its E/W routed experts, its MoE layers
    exchange tokens over it (expert parallelism), long prefill chunks may be split over
    the ranks (context parallelism), and it steps in lockstep with its peers. Without
    one it is a plain worker holding every expert."""
    dev = serving_device(device)
    placement = None
    if communicator is not None:
        cfg = ModelConfig.from_json(Path(checkpoint) / "config.json")
        placement = ExpertPlacement(cfg.n_routed_experts, world_size)
    model = load_model(checkpoint, dtype=dtype, simulate_quant=simulate_quant, progress=progress,
                       expert_ids=None if placement is None else placement.local_experts(rank),
                       resident_quant=dev.type == "cuda", device=dev)  # fmt: skip
    if communicator is None:
        return ModelWorker(model, page_size=page_size)
    apply_expert_parallel(model, placement, communicator())
    apply_context_parallel(model, communicator())
    return ModelWorker(model, lockstep=True, page_size=page_size)
