"""Expert parallelism applied from outside the model: a worker's MoE layers dispatch their
tokens to the workers that own the chosen experts and combine the results.

The model itself is unchanged (docs/style.md §5): `apply_expert_parallel` swaps each block's
`ffn` for an `EPMoE` that wraps it, keeping the gate, this worker's experts and the
shared expert, and adding the all-to-all.

Statistics: every MoE layer of one worker records into one `DispatchStats` (router/stats.py),
reachable as `model.dispatch_stats` (set here, from outside, like the `ffn` swap). An
expert-parallel model records routing, traffic and time; a plain one (W = 1) can record its
routing through `count_routing`, which hooks the gates and leaves `workers/moe.py` unchanged.
Legend: T tokens on this worker, R rows received, d hidden size.
"""

from __future__ import annotations

import torch
from torch import nn

from router.comm import Communicator
from router.dispatch import combine, dispatch
from router.placement import ExpertPlacement
from router.stats import DispatchStats
from workers.model import Transformer
from workers.moe import MoE


class EPMoE(nn.Module):
    """gate -> dispatch -> local experts -> combine, plus the shared expert on the local tokens.

    `stats` (None: off) receives this layer's routing, traffic and time."""

    def __init__(
        self, moe: MoE, placement: ExpertPlacement, comm: Communicator, layer_id: int,
        stats: DispatchStats | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        local = placement.local_experts(comm.rank)
        if moe.experts.expert_ids != local:
            raise ValueError(f"rank {comm.rank} holds experts {moe.experts.expert_ids}, placement says {local}")
        self.moe, self.placement, self.comm, self.layer_id = moe, placement, comm, layer_id
        self.stats = stats

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """x [T, d] (ffn_norm output; T may be 0) -> [T, d]; joins two collectives whatever T is."""
        weights, ids = self.moe.gate(x, input_ids)
        recv, handle = dispatch(x, ids, weights, self.placement, self.comm, layer=self.layer_id, stats=self.stats)
        out = self.moe.experts(recv, handle.recv_local_ids, handle.recv_weights)
        y = combine(out, handle)
        y += self.moe.shared_experts(x).float()
        return y.to(x.dtype)


def apply_expert_parallel(
    model: Transformer, placement: ExpertPlacement, comm: Communicator, stats: DispatchStats | None = None
) -> Transformer:
    """Make every MoE layer of `model` (main layers and MTP) expert-parallel over `comm`.

    All layers record into `stats` (default: a new `DispatchStats`), kept as `model.dispatch_stats`.
    """
    stats = stats if stats is not None else DispatchStats(placement.num_experts)
    for blk in [*model.layers, *model.mtp]:
        blk.ffn = EPMoE(blk.ffn, placement, comm, blk.layer_id, stats)
    model.dispatch_stats = stats
    return model


def count_routing(model: Transformer, stats: DispatchStats | None = None) -> DispatchStats:
    """Record the routing (tokens per expert) of `model`'s plain MoE layers into `stats`
    (default: a new one), kept as `model.dispatch_stats`; expert-parallel layers are left as they are.
    A model that already records keeps its collector (its hooks are not added twice)."""
    current = getattr(model, "dispatch_stats", None)
    if current is not None:
        if stats is not None and stats is not current:
            raise ValueError("the model already records into another DispatchStats")
        return current
    stats = stats if stats is not None else DispatchStats(model.cfg.n_routed_experts)
    for blk in [*model.layers, *model.mtp]:
        if isinstance(blk.ffn, MoE):
            blk.ffn.gate.register_forward_hook(_routing_hook(stats, blk.layer_id))
    model.dispatch_stats = stats
    return stats


def _routing_hook(stats: DispatchStats, layer: int):
    def hook(_gate: nn.Module, _args: tuple, out: tuple[torch.Tensor, torch.Tensor]) -> None:
        stats.record_routing(layer, out[1])  # out = (weights [T, K], expert ids [T, K])

    return hook
