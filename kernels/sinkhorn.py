"""Sinkhorn projection of the mHC residual-mixing logits (docs/model.md §3).

Legend: T tokens, n = hc_mult streams (4). Per token, in this exact order (fp32):

    M = softmax(C, rows) + eps;  M = M / (col sums + eps)
    repeat iters - 1 times:  M = M / (row sums + eps);  M = M / (col sums + eps)

`sinkhorn` is that math in pure torch (any leading dims); `sinkhorn_ref` checks its arguments
and runs it in fp32. The kernel holds [BLOCK_T, n, n] matrices in registers for all iterations:
one read, one write.
"""

from __future__ import annotations

import torch

from kernels._triton import cdiv, kernel, next_pow2, tl


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project [..., n, n] logits toward a doubly stochastic matrix (docs/model.md §3, exact op order)."""
    m = logits.softmax(dim=-1) + eps
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


def _check(logits: torch.Tensor, iters: int) -> None:
    if logits.dim() != 3 or logits.shape[1] != logits.shape[2] or iters < 1:
        raise ValueError(f"sinkhorn wants logits [T, n, n] and iters >= 1, got {tuple(logits.shape)}, {iters}")


def _output(logits: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    if out.shape != logits.shape or out.dtype != torch.float32:
        raise ValueError(f"out must be {tuple(logits.shape)} float32, got {tuple(out.shape)} {out.dtype}")
    return out


def sinkhorn_ref(logits: torch.Tensor, iters: int, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """logits [T, n, n] -> fp32 [T, n, n]; `sinkhorn` above, in fp32."""
    _check(logits, iters)
    o = _output(logits, out)
    o.copy_(sinkhorn(logits.float(), iters, eps))
    return o


@kernel
def _sinkhorn_kernel(
    c_ptr, o_ptr, T, N, iters, eps,
    stride_ct, stride_ci, stride_ot, stride_oi,
    BLOCK_T: tl.constexpr, NP: tl.constexpr,
):  # fmt: skip
    """Program b: tokens [b * BLOCK_T, ...); NP = next_pow2(n), padding held at exactly 0."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ii = tl.arange(0, NP)
    t3 = toks[:, None, None]
    i3 = ii[None, :, None]
    j3 = ii[None, None, :]
    ok = (t3 < T) & (i3 < N) & (j3 < N)
    c = tl.load(c_ptr + t3.to(tl.int64) * stride_ct + i3 * stride_ci + j3, mask=ok, other=0.0).to(tl.float32)
    c = tl.where(j3 < N, c, float("-inf"))  # padded columns drop out of the softmax; padded rows stay finite
    e = tl.exp(c - tl.max(c, axis=2)[:, :, None])
    m = tl.where(ok, e / tl.sum(e, axis=2)[:, :, None] + eps, 0.0)
    m = m / (tl.sum(m, axis=1)[:, None, :] + eps)
    for _ in range(iters - 1):
        m = m / (tl.sum(m, axis=2)[:, :, None] + eps)
        m = m / (tl.sum(m, axis=1)[:, None, :] + eps)
    tl.store(o_ptr + t3.to(tl.int64) * stride_ot + i3 * stride_oi + j3, m, mask=ok)


def sinkhorn_triton(
    logits: torch.Tensor, iters: int, eps: float, out: torch.Tensor | None = None, block_t: int = 64
) -> torch.Tensor:
    """Triton version of `sinkhorn_ref` (same contract); grid [ceil(T / block_t)]."""
    _check(logits, iters)
    o = _output(logits, out)
    t, n, _ = logits.shape
    if t == 0:
        return o
    logits = logits.contiguous()
    assert o.is_contiguous()
    _sinkhorn_kernel[(cdiv(t, block_t),)](
        logits, o, t, n, iters, eps,
        logits.stride(0), logits.stride(1), o.stride(0), o.stride(1),
        BLOCK_T=block_t, NP=max(2, next_pow2(n)),
    )  # fmt: skip
    return o
