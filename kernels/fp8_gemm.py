"""FP8 block-scaled GEMM with per-token activation quantization (docs/model.md §8).

Legend: M rows (tokens), K input dim, N output dim; blocks of 128.

    x_q[m, kb] = e4m3(clamp(x[m, kb] / s[m, kb], ±448)),  s = 2^ceil(log2(max(amax_kb(x[m]), 1e-4) / 448))
    out[m, n]  = sum_kb s[m, kb] * w_scale[n // 128, kb] * (x_q[m, kb] . w[n, kb])     (fp32 accumulation)

for each 128-channel block kb (a ragged last block counts only its real channels), output
in x's dtype. The kernel quantizes activations in registers, rounding to e4m3 in fp32
arithmetic (ties to even) rather than with a float8 cast, so compiled and interpreted
runs agree with torch bit for bit; on CUDA both operands then feed bf16 tensor cores,
exactly (e4m3 values are bf16 values).
"""

from __future__ import annotations

import torch

from kernels._triton import cdiv, interpreting, kernel, tl
from kernels.quant import FP8_WEIGHT_BLOCK, act_qdq, dequant_fp8_weight

_E8M0 = (torch.uint8, torch.float8_e8m0fnu)


def _check(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> None:
    b = FP8_WEIGHT_BLOCK
    fits = x.dim() == 2 and w.dim() == 2 and w.shape[1] == x.shape[1]
    if not fits or w_scale.shape != (cdiv(w.shape[0], b), cdiv(w.shape[1], b)):
        raise ValueError(
            f"fp8_gemm: x {tuple(x.shape)}, w {tuple(w.shape)}, w_scale {tuple(w_scale.shape)} do not fit "
            "x [M, K], w [N, K], w_scale [ceil(N/128), ceil(K/128)]"
        )
    if w.dtype != torch.float8_e4m3fn or not (w_scale.dtype in _E8M0 or w_scale.dtype == torch.float32):
        raise ValueError(f"fp8_gemm wants an e4m3 weight and e8m0/fp32 scales, got {w.dtype}, {w_scale.dtype}")


def _output(x: torch.Tensor, n: int, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    if out.shape != (x.shape[0], n) or out.dtype != x.dtype:
        raise ValueError(f"out must be ({x.shape[0]}, {n}) {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    return out


def act_quant_dequant_ref(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> fp32 [M, K]: the per-token, per-128-channel e4m3 quant->dequant the GEMM applies."""
    return act_qdq(x.float())


def fp8_gemm_ref(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] fp32/bf16, w [N, K] e4m3, w_scale [ceil(N/128), ceil(K/128)] e8m0|fp32 -> [M, N] in x's dtype."""
    _check(x, w, w_scale)
    o = _output(x, w.shape[0], out)
    o.copy_(act_quant_dequant_ref(x) @ dequant_fp8_weight(w, w_scale).T)
    return o


@kernel
def _fp8_gemm_kernel(
    x_ptr, w_ptr, s_ptr, o_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCALE_E8M0: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """Program (m, n): rows tile m, columns tile n; K in steps of one 128-block."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = rows < M
    c_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, 128):
        ks = k0 + tl.arange(0, 128)
        k_ok = ks < K
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :],
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
        # s = 2^e: the least e with amax <= 448 * 2^e, i.e. e = floor(log2 t) - 8, plus 1 when t's mantissa > 1.75
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)
        abits = amax.to(tl.int32, bitcast=True)
        e = ((abits >> 23) & 0xFF) - 127 - 8 + ((abits & 0x7FFFFF) > 0x600000).to(tl.int32)
        x_scale = ((e + 127) << 23).to(tl.float32, bitcast=True)  # [BLOCK_M]
        v = x * ((127 - e) << 23).to(tl.float32, bitcast=True)[:, None]  # x / s, exact
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        # round to e4m3 (3 mantissa bits, subnormal step 2^-9), ties to even, in fp32
        ve = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
        y = v * ((127 + 3 - ve) << 23).to(tl.float32, bitcast=True)  # v / step, |y| < 16
        y = (y + 12582912.0) - 12582912.0  # 1.5 * 2^23: rounds to an integer, ties to even
        xq = y * ((127 - 3 + ve) << 23).to(tl.float32, bitcast=True)

        wq = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :],
                     mask=c_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        sc = tl.load(s_ptr + (cols // 128) * stride_sn + k0 // 128, mask=c_ok, other=127)
        if SCALE_E8M0:
            sb = sc.to(tl.int32)
            sc = tl.where(sb == 0, 0x00400000, tl.where(sb == 255, 0x7FC00000, sb << 23)).to(tl.float32, bitcast=True)
        if DOT_F32:
            part = tl.dot(xq, tl.trans(wq.to(tl.float32)))
        else:
            part = tl.dot(xq.to(tl.bfloat16), tl.trans(wq.to(tl.bfloat16)))
        acc += part * x_scale[:, None] * sc.to(tl.float32)[None, :]
    tl.store(o_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=r_ok[:, None] & c_ok[None, :])  # fmt: skip


def fp8_gemm_triton(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out: torch.Tensor | None = None,
    block_m: int = 16, block_n: int = 64, num_warps: int = 4,
) -> torch.Tensor:  # fmt: skip
    """Triton version of `fp8_gemm_ref` (same contract); grid [ceil(M / block_m), ceil(N / block_n)]."""
    _check(x, w, w_scale)
    o = _output(x, w.shape[0], out)
    m, k = x.shape
    if m == 0 or w.shape[0] == 0:
        return o
    x = x if x.stride(1) == 1 else x.contiguous()
    w = w.contiguous()
    e8m0 = w_scale.dtype in _E8M0
    w_scale = (w_scale.view(torch.uint8) if e8m0 else w_scale).contiguous()
    assert o.stride(1) == 1
    grid = (cdiv(m, block_m), cdiv(w.shape[0], block_n))
    _fp8_gemm_kernel[grid](
        x, w, w_scale, o,
        m, w.shape[0], k,
        x.stride(0), w.stride(0), w_scale.stride(0), o.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, SCALE_E8M0=e8m0, DOT_F32=interpreting(x.device), num_warps=num_warps,
    )  # fmt: skip
    return o
