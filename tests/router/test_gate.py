from __future__ import annotations

import pytest
import torch

from router.gate import route
from tests.router.support import full_moe


@pytest.mark.parametrize("layer_id", [0, 2])  # tiny: layer 0 hash-routed, layer 2 score-routed
def test_route_is_the_model_gate(layer_id):
    moe = full_moe(layer_id)
    x, ids = torch.randn(7, 128), torch.randint(0, 129280, (7,))
    weights, topk = route(x, ids, moe.gate)
    want_w, want_ids = moe.gate(x, ids)
    assert weights.dtype == torch.float32 and topk.dtype == torch.int64 and topk.shape == (7, 2)
    assert torch.equal(topk, want_ids) and torch.equal(weights, want_w)
    if moe.gate.is_hash:
        assert torch.equal(topk, moe.gate.tid2eid[ids])
    torch.testing.assert_close(weights.sum(1), torch.full((7,), moe.gate.route_scale))


@pytest.mark.parametrize("layer_id", [0, 2])
def test_route_with_no_tokens(layer_id):
    weights, topk = route(torch.empty(0, 128), torch.empty(0, dtype=torch.int64), full_moe(layer_id).gate)
    assert weights.shape == topk.shape == (0, 2)
