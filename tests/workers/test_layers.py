"""mHC, RoPE/YaRN and norms against the spec's formulas, written out independently here."""

from __future__ import annotations

import math

import torch

from workers.config import RopeScaling
from workers.layers import apply_rope, hc_post, hc_pre, rope_cos_sin, rope_inv_freq, sinkhorn


def test_sinkhorn_is_near_doubly_stochastic():
    # 20 iterations end on a column step: columns sum to 1, rows nearly (for unit-scale
    # logits; a rare matrix converges slower, so the row bound is loose and the input seeded).
    gen = torch.Generator().manual_seed(0)
    m = sinkhorn(torch.randn(256, 4, 4, generator=gen), iters=20, eps=1e-6)
    assert (m > 0).all()
    torch.testing.assert_close(m.sum(-1), torch.ones(256, 4), atol=5e-3, rtol=0)
    torch.testing.assert_close(m.sum(-2), torch.ones(256, 4), atol=1e-5, rtol=0)


def test_sinkhorn_exact_op_order():
    c = torch.randn(4, 4)
    m = torch.softmax(c, -1) + 1e-6
    m = m / (m.sum(0) + 1e-6)
    m = m / (m.sum(1, keepdim=True) + 1e-6)
    m = m / (m.sum(0) + 1e-6)
    torch.testing.assert_close(sinkhorn(c, iters=2, eps=1e-6), m, rtol=0, atol=0)


def test_yarn_ramp_bounds_match_spec():
    # SPEC §5: base 160000, 64 rope dims, original 65536 -> low = 15, high = 25.
    yarn = RopeScaling()
    plain = rope_inv_freq(64, 160000.0, None)
    scaled = rope_inv_freq(64, 160000.0, yarn)
    assert torch.equal(scaled[:15], plain[:15])  # fast dims untouched
    torch.testing.assert_close(scaled[25:], plain[25:] / 16)  # slow dims interpolated
    assert ((scaled[16:25] < plain[16:25]) & (scaled[16:25] > plain[16:25] / 16)).all()


def test_rope_is_interleaved_on_last_dims_and_inverts():
    x = torch.randn(5, 3, 16)
    pos = torch.arange(5) * 7
    inv = rope_inv_freq(8, 10000.0, None)
    cos, sin = rope_cos_sin(inv, pos)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., :8], x[..., :8])
    # pair (8, 9) of token 1 rotates by angle pos * inv_freq[0]
    a = 7 * inv[0].item()
    x0, x1 = x[1, :, 8], x[1, :, 9]
    torch.testing.assert_close(y[1, :, 8], x0 * math.cos(a) - x1 * math.sin(a))
    torch.testing.assert_close(y[1, :, 9], x0 * math.sin(a) + x1 * math.cos(a))
    torch.testing.assert_close(apply_rope(y, cos, sin, inverse=True), x, atol=1e-5, rtol=0)


def test_hc_pre_post_against_formula():
    t, n, d = 3, 4, 8
    x = torch.randn(t, n, d)
    fn, base, scale = torch.randn(24, n * d) * 0.1, torch.randn(24), torch.rand(3) + 0.5
    u, post, comb = hc_pre(x, fn, scale, base, iters=20, hc_eps=1e-6, norm_eps=1e-6)
    flat = x.reshape(t, -1)
    mixes = (flat @ fn.T) / torch.sqrt(flat.pow(2).mean(-1, keepdim=True) + 1e-6)
    pre = torch.sigmoid(mixes[:, :4] * scale[0] + base[:4]) + 1e-6
    torch.testing.assert_close(u, (pre[:, :, None] * x).sum(1))
    torch.testing.assert_close(post, 2 * torch.sigmoid(mixes[:, 4:8] * scale[1] + base[4:8]))
    v = torch.randn(t, d)
    out = hc_post(v, x, post, comb)
    for j in range(n):  # stream j sums COLUMN j of comb
        expect = post[:, j, None] * v + sum(comb[:, i, j, None] * x[:, i] for i in range(n))
        torch.testing.assert_close(out[:, j], expect)
