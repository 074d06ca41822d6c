"""Small building blocks of DeepSeek-V4: weights, RMSNorm, RoPE/YaRN frequencies, mHC.

The pure-torch math the kernels fuse lives beside them: `rms_scale` and `apply_rope` in
kernels.rmsnorm_rope, `sinkhorn` in kernels.sinkhorn.

Legend: T tokens of a flat batch, n = hc_mult residual streams, d = hidden size,
H heads, rd = rope dims (the LAST rd dims of a head), mix = (2 + n) * n.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.quant import act_qdq, dequant_fp8_weight, quant_fp8_weight
from workers.config import RopeScaling


def default_cpu_dtype() -> torch.dtype:
    """bfloat16 where the CPU has native bf16 matmul (AVX512-BF16/AMX), else float32.

    Without it, oneDNN emulates bf16 and a GEMM is several times slower than in fp32.
    """
    try:
        fast_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        fast_bf16 = False
    return torch.bfloat16 if fast_bf16 else torch.float32


class Linear(nn.Module):
    """A bias-free linear layer whose parameter is called `weight`, as in the checkpoint.

    Quantized checkpoint weights are dequantized at load (docs/model.md §8); the GEMM runs in
    the weight's dtype, so `x` is cast to it first. A weight stored in FP8 gets the
    official FP8 GEMM's numerics (`act_quant`, set by the loader): activations rounded to
    e4m3 per token and 128 channels first; on the kernel path (GPU) `kernels.fp8_gemm`
    runs it on the e4m3 weight (re-quantized from the loaded one, exactly: its block
    scales are powers of two).

    `pack_fp8()` makes that e4m3 weight resident instead: buffers `weight_fp8` [out, in]
    e4m3 and `weight_scale` [ceil(out/128), ceil(in/128)] ue8m0 replace `weight`, which
    is gone; the torch path then dequantizes per call (same values, so same results).
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.act_quant = False
        self.is_packed = False
        self.compute_dtype = dtype
        self._fp8: tuple[torch.Tensor, torch.Tensor] | None = None  # (e4m3 weight, ue8m0 scales) for the kernel

    def pack_fp8(self) -> None:
        """Keep only the e4m3 weight and its block scales (for an `act_quant` layer)."""
        assert self.act_quant and not self.is_packed, "only an unpacked FP8 layer (act_quant) packs"
        w = self.weight
        q, scale = quant_fp8_weight(w.detach())
        del self.weight
        self.compute_dtype, self.is_packed, self._fp8 = w.dtype, True, None
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale)

    def kernel_copy_bytes(self) -> int:
        """Bytes of the e4m3 copy the kernel path re-quantized lazily (0 when packed: nothing is copied)."""
        return sum(t.numel() * t.element_size() for t in self._fp8 or ())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.act_quant:
            return F.linear(x.to(self.weight.dtype), self.weight)
        dtype = self.compute_dtype if self.is_packed else self.weight.dtype
        if kernels.use_triton(x):
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            return kernels.fp8_gemm(flat, *self._fp8_weight()).view(*x.shape[:-1], -1)
        w = dequant_fp8_weight(self.weight_fp8, self.weight_scale).to(dtype) if self.is_packed else self.weight
        return F.linear(act_qdq(x.to(dtype)), w)

    def _fp8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(e4m3 weight, ue8m0 scales): the resident pair, or one re-quantized once per device."""
        if self.is_packed:
            return self.weight_fp8, self.weight_scale
        if self._fp8 is None or self._fp8[0].device != self.weight.device:
            self._fp8 = quant_fp8_weight(self.weight)
        return self._fp8


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 with an fp32 weight; the result has x's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


# -- RoPE ---------------------------------------------------------------------------------


def rope_inv_freq(rope_dim: int, base: float, yarn: RopeScaling | None) -> torch.Tensor:
    """[rd/2] fp32 angular frequencies; YaRN interpolation when `yarn` is given (docs/model.md §5)."""
    freqs = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    if yarn is None:
        return freqs

    def correction_dim(num_rotations: float) -> float:
        orig = yarn.original_max_position_embeddings
        return rope_dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp
    return freqs / yarn.factor * (1 - smooth) + freqs * smooth


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [T, rd/2] fp32 for integer `positions` [T]."""
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


# -- mHC ----------------------------------------------------------------------------------


def _hc_mixes(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """[T, n, d] streams -> [T, mix] coefficients; the weightless RMS applies after the matmul."""
    flat = x.flatten(-2).float()
    rsqrt = torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    return F.linear(flat, fn) * rsqrt


def hc_pre(
    x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
    iters: int, hc_eps: float, norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """mHC entry: x [T, n, d] -> (u [T, d] in x's dtype, post [T, n] fp32, comb [T, n, n] fp32)."""
    n = x.shape[-2]
    mixes = _hc_mixes(x, fn, norm_eps)
    pre = torch.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + hc_eps
    post = 2 * torch.sigmoid(mixes[..., n : 2 * n] * scale[1] + base[n : 2 * n])
    comb_logits = mixes[..., 2 * n :].unflatten(-1, (n, n)) * scale[2] + base[2 * n :].view(n, n)
    comb = kernels.sinkhorn(comb_logits, iters, hc_eps)
    u = (pre.unsqueeze(-1) * x.float()).sum(dim=-2)
    return u.to(x.dtype), post, comb


def hc_post(v: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """mHC exit: stream j = post[j] * v + sum_i comb[i, j] * residual[i] (note the transpose)."""
    mixed = torch.einsum("tij,tid->tjd", comb, residual.float())
    return (post.unsqueeze(-1) * v.float().unsqueeze(-2) + mixed).to(v.dtype)


def hc_head(
    x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_eps: float, norm_eps: float
) -> torch.Tensor:
    """Final collapse of the streams: x [T, n, d] -> [T, d] (no post/comb)."""
    pre = torch.sigmoid(_hc_mixes(x, fn, norm_eps) * scale + base) + hc_eps
    return (pre.unsqueeze(-1) * x.float()).sum(dim=-2).to(x.dtype)
