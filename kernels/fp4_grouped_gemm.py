"""Grouped GEMM over expert-sorted rows with FP4 (e2m1) expert weights (docs/model.md §6, §8).

Legend: P rows sorted by expert, K input dim (K % 32 == 0), N output dim, E experts.
Rows offsets[e]:offsets[e+1] use expert e:

    out[p] = x[p] @ W_e^T,   W_e[n, k] = e2m1(packed[e, n, k // 2] nibble k % 2) * 2^(scale[e, n, k // 32] - 127)

The low nibble of a byte is the even element. The kernel dequantizes weight tiles in
registers; each program finds its (expert, row tile) from the offsets, so the grid is
fixed by (P, E) with no host sync; programs past the last tile do nothing.
"""

from __future__ import annotations

import torch

from kernels._triton import cdiv, interpreting, kernel, next_pow2, tl
from kernels.quant import FP4_WEIGHT_BLOCK, dequant_fp4_weight


def _check(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor) -> None:
    p, k = x.shape
    e, n, half = packed.shape
    fits = half * 2 == k and scale.shape == (e, n, k // FP4_WEIGHT_BLOCK) and offsets.shape == (e + 1,)
    if k % FP4_WEIGHT_BLOCK or not fits:
        raise ValueError(
            f"fp4_grouped_gemm: x {tuple(x.shape)}, packed {tuple(packed.shape)}, scale {tuple(scale.shape)}, "
            f"offsets {tuple(offsets.shape)} do not fit x [P, K], packed [E, N, K/2], scale [E, N, K/32], "
            "offsets [E+1] (K % 32 == 0)"
        )
    if packed.dtype not in (torch.uint8, torch.int8) or scale.dtype not in (torch.uint8, torch.float8_e8m0fnu):
        raise ValueError(f"fp4_grouped_gemm wants uint8 weights and e8m0 scales, got {packed.dtype}, {scale.dtype}")


def _output(x: torch.Tensor, n: int, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    if out.shape != (x.shape[0], n) or out.dtype != x.dtype:
        raise ValueError(f"out must be ({x.shape[0]}, {n}) {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    return out


def fp4_grouped_gemm_ref(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """x [P, K] fp32/bf16, packed [E, N, K/2] uint8, scale [E, N, K/32] e8m0, offsets [E+1] -> [P, N] in x's dtype.

    Dequantizes one expert at a time (kernels.quant) and multiplies in fp32.
    """
    _check(x, packed, scale, offsets)
    o = _output(x, packed.shape[1], out)
    bounds = offsets.tolist()
    if bounds[0] != 0 or bounds[-1] != x.shape[0] or any(a > b for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(f"offsets must rise from 0 to P={x.shape[0]}, got {bounds}")
    for e, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
        if end > start:
            w = dequant_fp4_weight(packed[e], scale[e])  # [N, K] fp32
            o[start:end] = (x[start:end].float() @ w.T).to(o.dtype)
    return o


@kernel
def _fp4_grouped_gemm_kernel(
    x_ptr, w_ptr, s_ptr, off_ptr, o_ptr,
    E, N, K,
    stride_xp, stride_we, stride_wn, stride_se, stride_sn, stride_op,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_F32: tl.constexpr,
):  # fmt: skip
    """Program (m, n): the m-th row tile over all experts in order, output columns tile n."""
    pid_m = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    e_ok = experts < E
    starts = tl.load(off_ptr + experts, mask=e_ok, other=0)
    ends = tl.load(off_ptr + experts + 1, mask=e_ok, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    done = tl.cumsum(tiles, axis=0)  # row tiles of experts 0..e inclusive
    e = tl.sum((done <= pid_m).to(tl.int32), axis=0)  # this program's expert (E: past the end)
    first = tl.sum(tl.where(experts == e, done - tiles, 0), axis=0)  # its first tile's number
    row0 = tl.sum(tl.where(experts == e, starts, 0), axis=0) + (pid_m - first) * BLOCK_M
    row_end = tl.sum(tl.where(experts == e, ends, 0), axis=0)
    k_end = tl.where(e < E, K, 0)  # idle programs skip the loop
    e64 = tl.minimum(e, E - 1).to(tl.int64)

    rows = row0 + tl.arange(0, BLOCK_M)
    r_ok = rows < row_end
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xp + ks[None, :],
                    mask=r_ok[:, None] & (ks < K)[None, :], other=0.0)  # fmt: skip
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        byte = tl.load(w_ptr + e64 * stride_we + cols[:, None] * stride_wn + kb[None, :],
                       mask=c_ok[:, None] & (kb < K // 2)[None, :], other=0).to(tl.int32)  # fmt: skip
        nib = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, BLOCK_K))  # low nibble = even k
        ex = (nib >> 1) & 3
        mag = tl.where(ex == 0, (nib & 1).to(tl.float32) * 0.5, ((nib & 1) + 2).to(tl.float32) * (1 << ex) * 0.25)
        val = tl.where(nib >= 8, -mag, mag)
        sb = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        sbyte = tl.load(s_ptr + e64 * stride_se + cols[:, None] * stride_sn + sb[None, :],
                        mask=c_ok[:, None] & (sb < K // 32)[None, :], other=127).to(tl.int32)  # fmt: skip
        sbits = tl.where(sbyte == 0, 0x00400000, tl.where(sbyte == 255, 0x7FC00000, sbyte << 23))
        sval = sbits.to(tl.float32, bitcast=True)  # 2^(byte - 127); 255 is NaN
        w = tl.reshape(tl.reshape(val, (BLOCK_N, BLOCK_K // 32, 32)) * sval[:, :, None], (BLOCK_N, BLOCK_K))
        if DOT_F32:
            x = x.to(tl.float32)
        else:
            w = w.to(x.dtype)  # exact: an e2m1 value times a power of two
        acc += tl.dot(x, tl.trans(w))
    tl.store(o_ptr + rows.to(tl.int64)[:, None] * stride_op + cols[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=r_ok[:, None] & c_ok[None, :])  # fmt: skip


def fp4_grouped_gemm_triton(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor,
    out: torch.Tensor | None = None, block_m: int = 16, block_n: int = 64, block_k: int = 128, num_warps: int = 4,
) -> torch.Tensor:  # fmt: skip
    """Triton version of `fp4_grouped_gemm_ref` (same contract; offsets are not validated: no host sync).

    Grid [ceil(P / block_m) + E, ceil(N / block_n)]: an upper bound on the row tiles.
    """
    _check(x, packed, scale, offsets)
    e, n, _ = packed.shape
    o = _output(x, n, out)
    if x.shape[0] == 0 or n == 0:
        return o
    x = x if x.stride(1) == 1 else x.contiguous()
    packed, scale = packed.view(torch.uint8).contiguous(), scale.view(torch.uint8).contiguous()
    assert block_k % 64 == 0 and o.stride(1) == 1
    grid = (cdiv(x.shape[0], block_m) + e, cdiv(n, block_n))
    _fp4_grouped_gemm_kernel[grid](
        x, packed, scale, offsets.to(torch.int32).contiguous(), o,
        e, n, x.shape[1],
        x.stride(0), packed.stride(0), packed.stride(1), scale.stride(0), scale.stride(1), o.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_E=max(16, next_pow2(e)),
        DOT_F32=interpreting(x.device) or x.dtype == torch.float32, num_warps=num_warps,
    )  # fmt: skip
    return o
