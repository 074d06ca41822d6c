from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.moe import MoE, grouped_linear
from workers.presets import preset_config


def make_moe(layer_id: int) -> MoE:
    cfg = preset_config("tiny")
    torch.manual_seed(0)
    moe = MoE(cfg, layer_id, torch.float32)
    for p in moe.parameters():
        p.data.normal_(0, 0.2)
    if moe.gate.is_hash:
        moe.gate.tid2eid.copy_(torch.randint(0, cfg.n_routed_experts, moe.gate.tid2eid.shape))
    return moe


def reference_moe(moe: MoE, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """docs/model.md §6 written out token by token."""
    g, limit = moe.gate, moe.experts.limit
    out = []
    for t in range(x.shape[0]):
        s = F.softplus(x[t] @ g.weight.T).sqrt()
        sel = g.tid2eid[ids[t]] if g.is_hash else torch.topk(s + g.bias, g.top_k).indices
        w = s[sel] / s[sel].sum() * g.route_scale
        y = torch.zeros_like(x[t])
        for k, e in enumerate(sel.tolist()):
            h = F.silu((moe.experts.w1[e] @ x[t]).clamp(max=limit)) * (moe.experts.w3[e] @ x[t]).clamp(-limit, limit)
            y += w[k] * (moe.experts.w2[e] @ h)
        se = moe.shared_experts
        h = F.silu((se.w1.weight @ x[t]).clamp(max=limit)) * (se.w3.weight @ x[t]).clamp(-limit, limit)
        out.append(y + se.w2.weight @ h)
    return torch.stack(out)


def test_hash_layer_routes_by_token_id():
    moe = make_moe(0)
    assert moe.gate.is_hash
    x, ids = torch.randn(6, 128), torch.tensor([5, 99, 5, 128803, 0, 7])
    _, chosen = moe.gate(x, ids)
    assert torch.equal(chosen, moe.gate.tid2eid[ids])
    torch.testing.assert_close(moe(x, ids), reference_moe(moe, x, ids), atol=1e-4, rtol=1e-4)


def test_score_layer_bias_selects_but_does_not_weight():
    moe = make_moe(2)
    assert not moe.gate.is_hash
    x, ids = torch.randn(5, 128), torch.zeros(5, dtype=torch.long)
    moe.gate.bias.zero_()
    moe.gate.bias[3] = 100.0  # expert 3 always chosen...
    weights, chosen = moe.gate(x, ids)
    assert (chosen == 3).any(dim=1).all()
    s = F.softplus(x @ moe.gate.weight.T).sqrt()
    expect = s.gather(1, chosen)
    expect = expect / expect.sum(1, keepdim=True) * moe.gate.route_scale  # ...but weighted unbiased
    torch.testing.assert_close(weights, expect)
    torch.testing.assert_close(moe(x, ids), reference_moe(moe, x, ids), atol=1e-4, rtol=1e-4)


def test_grouped_linear_with_empty_groups():
    w = torch.randn(4, 6, 5)
    counts = torch.tensor([2, 0, 3, 0])
    x = torch.randn(5, 5)
    expect = torch.cat([x[:2] @ w[0].T, x[2:] @ w[2].T])
    torch.testing.assert_close(grouped_linear(x, w, counts), expect)
