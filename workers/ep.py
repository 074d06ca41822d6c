"""Expert parallelism applied from outside the model: a worker's MoE layers dispatch their
tokens to the workers that own the chosen experts and combine the results.

The model itself is unchanged (STYLE 5): `apply_expert_parallel` swaps each block's
`ffn` for an `EPMoE` that wraps it, keeping the gate, this worker's experts and the
shared expert, and adding the all-to-all.
Legend: T tokens on this worker, R rows received, d hidden size.
"""

from __future__ import annotations

import torch
from torch import nn

from router.comm import Communicator
from router.dispatch import combine, dispatch
from router.placement import ExpertPlacement
from workers.model import Transformer
from workers.moe import MoE


class EPMoE(nn.Module):
    """gate -> dispatch -> local experts -> combine, plus the shared expert on the local tokens."""

    def __init__(self, moe: MoE, placement: ExpertPlacement, comm: Communicator, layer_id: int) -> None:
        super().__init__()
        local = placement.local_experts(comm.rank)
        if moe.experts.expert_ids != local:
            raise ValueError(f"rank {comm.rank} holds experts {moe.experts.expert_ids}, placement says {local}")
        self.moe, self.placement, self.comm, self.layer_id = moe, placement, comm, layer_id

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """x [T, d] (ffn_norm output; T may be 0) -> [T, d]; joins two collectives whatever T is."""
        weights, ids = self.moe.gate(x, input_ids)
        recv, handle = dispatch(x, ids, weights, self.placement, self.comm, layer=self.layer_id)
        out = self.moe.experts(recv, handle.recv_local_ids, handle.recv_weights)
        y = combine(out, handle)
        y += self.moe.shared_experts(x).float()
        return y.to(x.dtype)


def apply_expert_parallel(model: Transformer, placement: ExpertPlacement, comm: Communicator) -> Transformer:
    """Make every MoE layer of `model` (main layers and MTP) expert-parallel over `comm`."""
    for blk in [*model.layers, *model.mtp]:
        blk.ffn = EPMoE(blk.ffn, placement, comm, blk.layer_id)
    return model
