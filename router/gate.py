"""Routing: which experts each token uses, and with what weight (docs/model.md §6).

Legend: T tokens, d hidden, K experts per token, E routed experts.

`Gate` is the routing math and a module of the model (each MoE layer's `ffn.gate`, whose
parameters the checkpoint names `ffn.gate.weight`, `ffn.gate.bias`, `ffn.gate.tid2eid`);
`route` calls it, so a worker's routing is bit-identical to the single-process model's:

- score layers: s = sqrt(softplus(x @ W_gate^T)); experts = topk(s + bias, K), where the
  bias steers selection only; weights = s[experts] / sum * routed_scaling_factor;
- hash layers (layer_id < num_hash_layers): experts = tid2eid[input_ids], weighted the same way.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class GateConfig(Protocol):
    """The fields of the model config a gate reads (workers.config.ModelConfig has them)."""

    hidden_size: int
    vocab_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    num_hash_layers: int
    scoring_func: str
    routed_scaling_factor: float


class Gate(nn.Module):
    """Scores and picks experts. Hash layers read `tid2eid`; others add `bias` for selection only."""

    def __init__(self, cfg: GateConfig, layer_id: int) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.score_func = cfg.scoring_func
        self.route_scale = cfg.routed_scaling_factor
        self.is_hash = layer_id < cfg.num_hash_layers
        e = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(e, cfg.hidden_size, dtype=torch.float32), requires_grad=False)
        if self.is_hash:
            self.register_buffer("tid2eid", torch.empty(cfg.vocab_size, self.top_k, dtype=torch.int64))
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.empty(e, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d], input_ids [T] -> (weights [T, K] fp32, expert ids [T, K] int64)."""
        scores = F.linear(x.float(), self.weight)
        if self.score_func == "softmax":
            scores = scores.softmax(dim=-1)
        elif self.score_func == "sigmoid":
            scores = scores.sigmoid()
        else:
            scores = F.softplus(scores).sqrt()
        if self.is_hash:
            ids = self.tid2eid[input_ids]
        else:
            ids = (scores + self.bias).topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.score_func != "softmax":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.route_scale, ids


def route(x: torch.Tensor, input_ids: torch.Tensor, gate: Gate) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d] (the MoE input, ffn_norm output), input_ids [T] -> (topk_weights [T, K] fp32, topk_ids [T, K] int64).

    `input_ids` are read only by hash layers; T = 0 gives two [0, K] tensors.
    """
    assert x.dim() == 2 and input_ids.shape == (x.shape[0],), f"x {tuple(x.shape)}, input_ids {tuple(input_ids.shape)}"
    weights, ids = gate(x, input_ids)
    return weights.float(), ids.long()
