"""Compressor pooling: gated softmax pooling of complete blocks into one entry each (docs/model.md §4.3).

Legend: n complete blocks, r = ratio rows per block, c compressor width, coff = 2 with
overlap (ratio 4) else 1. All fp32; scores already include the position bias `ape`.

    no overlap:  pooled[b, ch] = sum_p softmax_p(score[b, p, ch]) * kv[b, p, ch]         (r slots)
    overlap:     slots = prev[b, :, :c] (r rows) then cur[b, :, c:] (r rows); same formula (2r slots)

A block with no previous block (block 0) passes prev_kv 0 and prev_score -inf. This is
`workers.compressor.Compressor._emit` up to, not including, its RMSNorm. The kernel runs one
online softmax per channel over row tiles, so a ratio-128 block never sits in registers whole.
"""

from __future__ import annotations

import torch

from kernels._triton import cdiv, kernel, next_pow2, tl


def _check(
    kv: torch.Tensor, score: torch.Tensor, prev_kv: torch.Tensor | None, prev_score: torch.Tensor | None
) -> None:
    overlap = prev_kv is not None
    tensors = [kv, score] + ([prev_kv, prev_score] if overlap else [])
    ok = (prev_score is not None) == overlap and kv.dim() == 3 and all(t.shape == kv.shape for t in tensors)
    if not ok or kv.shape[1] == 0 or (overlap and kv.shape[-1] % 2):
        shapes = ", ".join("None" if t is None else str(tuple(t.shape)) for t in (kv, score, prev_kv, prev_score))
        raise ValueError(
            f"compressor_pool: kv, score, prev_kv, prev_score {shapes} do not fit [n, r, coff*c] "
            "(r >= 1; prev_kv and prev_score both given, coff = 2, or both None)"
        )
    if any(t.dtype != torch.float32 for t in tensors):
        raise ValueError(f"compressor_pool wants float32 inputs, got {[t.dtype for t in tensors]}")


def _output(kv: torch.Tensor, overlap: bool, out: torch.Tensor | None) -> torch.Tensor:
    shape = (kv.shape[0], kv.shape[2] // (2 if overlap else 1))
    if out is None:
        return torch.empty(shape, dtype=torch.float32, device=kv.device)
    if out.shape != shape or out.dtype != torch.float32:
        raise ValueError(f"out must be {shape} float32, got {tuple(out.shape)} {out.dtype}")
    return out


def compressor_pool_ref(
    kv: torch.Tensor, score: torch.Tensor, prev_kv: torch.Tensor | None = None, prev_score: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """kv, score [n, r, coff*c] fp32 (+ prev_kv, prev_score [n, r, 2c] with overlap) -> pooled [n, c] fp32."""
    _check(kv, score, prev_kv, prev_score)
    o = _output(kv, prev_kv is not None, out)
    if prev_kv is not None:
        c = o.shape[1]
        kv = torch.cat((prev_kv[..., :c], kv[..., c:]), dim=1)
        score = torch.cat((prev_score[..., :c], score[..., c:]), dim=1)
    o.copy_((kv * score.softmax(dim=1)).sum(dim=1))
    return o


@kernel
def _compressor_pool_kernel(
    kv_ptr, score_ptr, prev_kv_ptr, prev_score_ptr, o_ptr,
    R, C, CUR_OFF,
    stride_kn, stride_kr, stride_sn, stride_sr, stride_pkn, stride_pkr, stride_psn, stride_psr, stride_on,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, OVERLAP: tl.constexpr,
):  # fmt: skip
    """One program: block b = program_id(0), channels [BLOCK_C * program_id(1), ...).

    Running max m, sum of weights denom and weighted sum acc per channel. While every
    slot so far scored -inf (block 0's previous block), exponents use base 0, not m."""
    b = tl.program_id(0).to(tl.int64)  # offsets like b * stride_kn may pass 2^31
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = ch < C
    m = tl.full((BLOCK_C,), float("-inf"), tl.float32)
    denom = tl.zeros((BLOCK_C,), tl.float32)
    acc = tl.zeros((BLOCK_C,), tl.float32)
    if OVERLAP:  # slots 0 .. R-1: the previous block's first half
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            ok = (rows < R)[:, None] & c_ok[None, :]
            s = tl.load(prev_score_ptr + b * stride_psn + rows[:, None] * stride_psr + ch[None, :], mask=ok,
                        other=float("-inf"))  # fmt: skip
            v = tl.load(prev_kv_ptr + b * stride_pkn + rows[:, None] * stride_pkr + ch[None, :], mask=ok, other=0.0)
            m_new = tl.maximum(m, tl.max(s, axis=0))
            base = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - base)
            p = tl.exp(s - base[None, :])
            denom = denom * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p * v, axis=0)
            m = m_new
    for r0 in range(0, R, BLOCK_R):  # this block's rows (its second half when overlapping)
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = (rows < R)[:, None] & c_ok[None, :]
        cur = CUR_OFF + ch[None, :]
        s = tl.load(score_ptr + b * stride_sn + rows[:, None] * stride_sr + cur, mask=ok, other=float("-inf"))
        v = tl.load(kv_ptr + b * stride_kn + rows[:, None] * stride_kr + cur, mask=ok, other=0.0)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - base)
        p = tl.exp(s - base[None, :])
        denom = denom * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p * v, axis=0)
        m = m_new
    denom = tl.where(c_ok, denom, 1.0)  # padded channels: no 0 / 0
    tl.store(o_ptr + b * stride_on + ch, acc / denom, mask=c_ok)


def _dense_channels(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(2) == 1 else t.contiguous()


def compressor_pool_triton(
    kv: torch.Tensor, score: torch.Tensor, prev_kv: torch.Tensor | None = None, prev_score: torch.Tensor | None = None,
    out: torch.Tensor | None = None, block_c: int = 128, block_r: int = 32, num_warps: int = 4,
) -> torch.Tensor:  # fmt: skip
    """Triton version of `compressor_pool_ref` (same contract); grid [n, ceil(c / block_c)].

    Strided views (prev and this block sliced from one gathered [n, 2r, 2c] tensor, as
    decode does) are read in place when their channels are contiguous, else copied.
    """
    _check(kv, score, prev_kv, prev_score)
    overlap = prev_kv is not None
    o = _output(kv, overlap, out)
    n, r, _ = kv.shape
    c = o.shape[1]
    if n == 0 or c == 0:
        return o
    kv, score = _dense_channels(kv), _dense_channels(score)
    if prev_kv is None or prev_score is None:  # no overlap: the prev pointers are never read
        prev_kv, prev_score = kv, score
    prev_kv, prev_score = _dense_channels(prev_kv), _dense_channels(prev_score)
    assert o.stride(1) == 1, "out must be contiguous in c"
    _compressor_pool_kernel[(n, cdiv(c, block_c))](
        kv, score, prev_kv, prev_score, o,
        r, c, c if overlap else 0,
        kv.stride(0), kv.stride(1), score.stride(0), score.stride(1),
        prev_kv.stride(0), prev_kv.stride(1), prev_score.stride(0), prev_score.stride(1), o.stride(0),
        BLOCK_R=min(block_r, max(2, next_pow2(r))), BLOCK_C=block_c, OVERLAP=overlap, num_warps=num_warps,
    )  # fmt: skip
    return o
