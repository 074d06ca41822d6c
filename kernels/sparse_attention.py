"""Sparse attention with a sink over gathered key rows (docs/model.md §4.6).

Legend: T queries, H heads, D head dim, N key/value rows, L gathered rows per query.
K and V are the same row of `kv` (one shared head). Per query t and head h:

    logits_j = scale * q[t, h] . kv[idx[t, j]]          for idx[t, j] != -1
    o[t, h]  = sum_j exp(logits_j) kv[idx[t, j]] / (sum_j exp(logits_j) + exp(sink[h]))

The sink is a virtual key with a zero value: it only enlarges the denominator. A query
with no valid row gets zeros. The kernel runs one online softmax over tiles of L, seeded
with the sink (running max = sink, running sum = 1), so no pass over L is needed first.
"""

from __future__ import annotations

import torch

from kernels._triton import cdiv, interpreting, kernel, next_pow2, tl

_LOG2E = 1.4426950408889634
_REF_BLOCK_ELEMS = 1 << 22  # gathered keys per reference block: T_b * L * D floats (16 MiB)


def _check(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor) -> None:
    t, h, d = q.shape
    if kv.dim() != 2 or kv.shape[1] != d or idx.dim() != 2 or idx.shape[0] != t or sink.shape != (h,):
        raise ValueError(
            f"sparse_attention: q {tuple(q.shape)}, kv {tuple(kv.shape)}, idx {tuple(idx.shape)}, "
            f"sink {tuple(sink.shape)} do not fit q [T, H, D], kv [N, D], idx [T, L], sink [H]"
        )
    if q.dtype != kv.dtype:
        raise ValueError(f"sparse_attention: q is {q.dtype} but kv is {kv.dtype}")


def _output(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    return out


def sparse_attention_ref(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """q [T, H, D], kv [N, D], idx [T, L] int (-1 = none), sink [H] fp32 -> o [T, H, D] in q's dtype.

    Pure torch in fp32, in query blocks so the gathered [T_b, L, D] keys stay bounded.
    """
    _check(q, kv, idx, sink)
    o = _output(q, out)
    t, length, d = q.shape[0], idx.shape[1], q.shape[2]
    rows = max(1, _REF_BLOCK_ELEMS // max(1, length * d))
    kvf, sinkf = kv.float(), sink.float().view(1, -1, 1)
    for b0 in range(0, t, rows):
        ib = idx[b0 : b0 + rows].long()
        keys = kvf[ib.clamp(min=0)]  # [Tb, L, D]
        logits = torch.einsum("thd,tld->thl", q[b0 : b0 + rows].float(), keys) * scale
        logits = logits.masked_fill((ib < 0)[:, None, :], float("-inf"))
        peak = torch.maximum(logits.amax(dim=-1, keepdim=True), sinkf)
        probs = torch.exp(logits - peak)
        probs = probs / (probs.sum(dim=-1, keepdim=True) + torch.exp(sinkf - peak))
        o[b0 : b0 + rows] = torch.einsum("thl,tld->thd", probs, keys).to(o.dtype)
    return o


@kernel
def _sparse_attention_kernel(
    q_ptr, kv_ptr, idx_ptr, sink_ptr, o_ptr,
    H, L, D, scale_log2,
    stride_qt, stride_qh, stride_kv, stride_it, stride_ot, stride_oh,
    BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """One program: query t = program_id(0), heads [BLOCK_H * program_id(1), ...)."""
    t = tl.program_id(0).to(tl.int64)  # offsets like t * stride_qt may pass 2^31
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    h_ok = heads < H
    d_ok = dims < D
    q = tl.load(
        q_ptr + t * stride_qt + heads[:, None] * stride_qh + dims[None, :],
        mask=h_ok[:, None] & d_ok[None, :], other=0.0,
    )  # fmt: skip
    if DOT_F32:
        q = q.to(tl.float32)
    # log2 domain; the sink seeds the running max and contributes exp2(0) = 1 to the sum
    m = tl.load(sink_ptr + heads, mask=h_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    denom = tl.full((BLOCK_H,), 1.0, tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    for l0 in range(0, L, BLOCK_L):
        slots = l0 + tl.arange(0, BLOCK_L)
        rows = tl.load(idx_ptr + t * stride_it + slots, mask=slots < L, other=-1)
        valid = rows >= 0
        k = tl.load(
            kv_ptr + rows.to(tl.int64)[:, None] * stride_kv + dims[None, :],
            mask=valid[:, None] & d_ok[None, :], other=0.0,
        )  # fmt: skip
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale_log2  # [BLOCK_H, BLOCK_L]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k)
        m = m_new
    o = acc / denom[:, None]
    tl.store(
        o_ptr + t * stride_ot + heads[:, None] * stride_oh + dims[None, :],
        o.to(o_ptr.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :],
    )  # fmt: skip


def sparse_attention_triton(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float,
    out: torch.Tensor | None = None, block_h: int = 16, block_l: int = 32, num_warps: int = 4,
) -> torch.Tensor:  # fmt: skip
    """Triton version of `sparse_attention_ref` (same contract); grid [T, ceil(H / block_h)].

    `block_h` heads share each gathered key tile; rows of `idx` must lie in [-1, N).
    """
    _check(q, kv, idx, sink)
    o = _output(q, out)
    t, h, d = q.shape
    if t == 0:
        return o
    q = q if q.stride(2) == 1 else q.contiguous()
    kv, idx = kv.contiguous(), idx.to(torch.int32).contiguous()
    assert o.stride(2) == 1, "out must be contiguous in D"
    interp = interpreting(q.device)
    grid = (t, cdiv(h, block_h))
    _sparse_attention_kernel[grid](
        q, kv, idx, sink.float().contiguous(), o,
        h, idx.shape[1], d, scale * _LOG2E,
        q.stride(0), q.stride(1), kv.stride(0), idx.stride(0), o.stride(0), o.stride(1),
        BLOCK_H=block_h, BLOCK_L=block_l, BLOCK_D=max(16, next_pow2(d)),
        DOT_F32=interp or q.dtype == torch.float32, num_warps=num_warps,
    )  # fmt: skip
    return o
