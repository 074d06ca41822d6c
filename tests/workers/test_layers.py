"""mHC and RoPE/YaRN frequencies against the spec's formulas, written out independently here."""

from __future__ import annotations

import torch

from workers.config import RopeScaling
from workers.layers import hc_post, hc_pre, rope_inv_freq


def test_yarn_ramp_bounds_match_spec():
    # docs/model.md §5: base 160000, 64 rope dims, original 65536 -> low = 15, high = 25.
    yarn = RopeScaling()
    plain = rope_inv_freq(64, 160000.0, None)
    scaled = rope_inv_freq(64, 160000.0, yarn)
    assert torch.equal(scaled[:15], plain[:15])  # fast dims untouched
    torch.testing.assert_close(scaled[25:], plain[25:] / 16)  # slow dims interpolated
    assert ((scaled[16:25] < plain[16:25]) & (scaled[16:25] > plain[16:25] / 16)).all()


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
