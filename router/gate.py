"""Routing: which experts each token uses, and with what weight (SPEC §6).

Legend: T tokens, d hidden, K experts per token, E routed experts.

The math lives in the model (`workers.moe.Gate`); the router only calls it, so a worker's
routing is bit-identical to the single-process model's:

- score layers: s = sqrt(softplus(x @ W_gate^T)); experts = topk(s + bias, K), where the
  bias steers selection only; weights = s[experts] / sum * routed_scaling_factor;
- hash layers (layer_id < num_hash_layers): experts = tid2eid[input_ids], weighted the same way.
"""

from __future__ import annotations

import torch

from workers.moe import Gate


def route(x: torch.Tensor, input_ids: torch.Tensor, gate: Gate) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d] (the MoE input, ffn_norm output), input_ids [T] -> (topk_weights [T, K] fp32, topk_ids [T, K] int64).

    `input_ids` are read only by hash layers; T = 0 gives two [0, K] tensors.
    """
    assert x.dim() == 2 and input_ids.shape == (x.shape[0],), f"x {tuple(x.shape)}, input_ids {tuple(input_ids.shape)}"
    weights, ids = gate(x, input_ids)
    return weights.float(), ids.long()
