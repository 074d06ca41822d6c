"""Sinkhorn (mHC) and fused RMSNorm + interleaved RoPE: the pure-torch math against the spec's
formulas written out independently here, the Triton kernels (interpreter) vs the torch references,
and the references vs the model's layers."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.rmsnorm_rope import apply_rope, rmsnorm_rope_ref, rmsnorm_rope_triton
from kernels.sinkhorn import sinkhorn, sinkhorn_ref, sinkhorn_triton
from tests.kernels.helpers import assert_close, poisoned, requires_triton
from workers.layers import RMSNorm, rope_cos_sin, rope_inv_freq

EPS = 1e-6


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


def test_sinkhorn_reference_is_nearly_doubly_stochastic() -> None:
    m = sinkhorn_ref(torch.randn(8, 4, 4, generator=torch.Generator().manual_seed(0)), 20, EPS)
    torch.testing.assert_close(m.sum(-2), torch.ones(8, 4), atol=1e-5, rtol=0)  # columns were normalised last
    torch.testing.assert_close(m.sum(-1), torch.ones(8, 4), atol=1e-2, rtol=0)


@requires_triton
@pytest.mark.parametrize("t_n", [(70, 4), (5, 3), (1, 4)])  # two programs; n padded to 4; one token
def test_sinkhorn_kernel_matches_reference(t_n: tuple[int, int]) -> None:
    t, n = t_n
    logits = torch.randn(t, n, n, generator=torch.Generator().manual_seed(t)) * 3
    out = sinkhorn_triton(logits, 20, EPS, out=poisoned((t, n, n), torch.float32))
    assert_close(out, sinkhorn_ref(logits, 20, EPS), rtol=1e-5, atol=1e-6)


def _rope_inputs(shape: tuple[int, ...], rd: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    angles = torch.rand(shape[0], rd // 2, generator=g) * 100
    weight = torch.rand(shape[-1], generator=g) + 0.5
    return x, weight, angles.cos(), angles.sin()


def test_rmsnorm_rope_reference_matches_model_layers() -> None:
    x, weight, cos, sin = _rope_inputs((5, 64), 16, torch.bfloat16)
    norm = RMSNorm(64, EPS)
    norm.weight.data.copy_(weight)
    assert torch.equal(rmsnorm_rope_ref(x, weight, cos, sin, EPS), apply_rope(norm(x), cos, sin))


@requires_triton
@pytest.mark.parametrize(
    "shape_rd_weighted",
    [
        ((7, 48), 32, True),  # kv path: RMSNorm with weight, D not a power of two, ragged row block
        ((3, 6, 64), 16, False),  # q path: per-head weightless norm
        ((1, 512), 64, True),  # one token at the model's head dim
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_rope_kernel_matches_reference(shape_rd_weighted, dtype: torch.dtype) -> None:
    shape, rd, weighted = shape_rd_weighted
    x, weight, cos, sin = _rope_inputs(shape, rd, dtype, seed=len(shape))
    w = weight if weighted else None
    out = rmsnorm_rope_triton(x, w, cos, sin, EPS, out=poisoned(tuple(x.shape), dtype))
    ref = rmsnorm_rope_ref(x, w, cos, sin, EPS)
    if dtype == torch.bfloat16:  # the interpreter truncates after the norm and after the rotation: ulps of the row
        assert_close(out, ref, rtol=2.0**-6, atol=2.0**-7 * float(ref.float().abs().max()))
    else:
        assert_close(out, ref)
