"""Fused RMSNorm + interleaved RoPE on the last rd dims (docs/model.md §4.1, §5).

Legend: T tokens, H heads (absent for kv), D head dim, rd = 2 * cos.shape[1] rope dims.

    y = RMSNorm(x) = (weight * (x * rsqrt(mean(x^2) + eps))) in x's dtype      (weight given: kv_norm)
    y = x * rsqrt(mean(x^2) + eps).to(x.dtype)                                  (weight None: q's per-head norm)
    y[..., D-rd:] rotated: pairs (2i, 2i+1) by the angle of cos[t, i], sin[t, i], in fp32, back to x's dtype

matching the model's RMSNorm (workers.layers) or `rms_scale`, then `apply_rope`, rounding step
for rounding. `rms_scale` and `apply_rope` are that math in pure torch; the model also calls
`apply_rope` on its own (rotations not preceded by a norm).
"""

from __future__ import annotations

import torch

from kernels._triton import cdiv, kernel, next_pow2, tl


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS normalisation over the last dim (q's per-head norm), in x's dtype."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last rd dims of x [T, ..., D] with interleaved pairs (2i, 2i+1).

    cos/sin are [T, rd/2]; `inverse` applies the conjugate rotation (output de-rotation).
    Computed in fp32 and returned in x's dtype; the first D - rd dims are untouched.
    """
    rd = 2 * cos.shape[-1]
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    c, s = cos.view(shape), sin.view(shape)
    if inverse:
        s = -s
    rot = x[..., -rd:].float().unflatten(-1, (-1, 2))
    x0, x1 = rot[..., 0], rot[..., 1]
    rotated = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return torch.cat((x[..., :-rd], rotated.to(x.dtype)), dim=-1)


def _check(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor) -> None:
    d, half = x.shape[-1], cos.shape[-1]
    ok = x.dim() in (2, 3) and cos.shape == (x.shape[0], half) and sin.shape == cos.shape and 2 * half <= d
    if not ok or d % 2 or (weight is not None and weight.shape != (d,)):
        raise ValueError(
            f"rmsnorm_rope: x {tuple(x.shape)}, weight {None if weight is None else tuple(weight.shape)}, "
            f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)} do not fit x [T, (H,) D] (D even), weight [D], "
            "cos/sin [T, rd/2]"
        )


def _output(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty_like(x)
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"out must be {tuple(x.shape)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    return out


def rmsnorm_rope_ref(
    x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """x [T, D] or [T, H, D], weight [D] fp32 or None, cos/sin [T, rd/2] fp32 -> like x."""
    _check(x, weight, cos, sin)
    o = _output(x, out)
    if weight is None:
        y = rms_scale(x, eps)
    else:
        xf = x.float()
        y = (weight.float() * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps))).to(x.dtype)
    o.copy_(apply_rope(y, cos, sin))
    return o


@kernel
def _rmsnorm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, o_ptr,
    R, H, D, HALF_RD, eps,
    stride_xr, stride_or, stride_ct,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WEIGHT: tl.constexpr,
):  # fmt: skip
    """Program b: rows [b * BLOCK_R, ...) of x viewed [T * H, D]; row r is token r // H."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    r_ok = rows < R
    ok = r_ok[:, None] & (dims < D)[None, :]
    xin = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xr + dims[None, :], mask=ok, other=0.0)
    x = xin.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
    if HAS_WEIGHT:
        w = tl.load(w_ptr + dims, mask=dims < D, other=0.0).to(tl.float32)
        y = (w[None, :] * (x * inv)).to(xin.dtype).to(tl.float32)
    else:
        y = (x * inv.to(xin.dtype).to(tl.float32)).to(xin.dtype).to(tl.float32)
    even, odd = tl.split(tl.reshape(y, (BLOCK_R, BLOCK_D // 2, 2)))  # pair p = dims (2p, 2p + 1)
    pair = tl.arange(0, BLOCK_D // 2)[None, :] - (D // 2 - HALF_RD)  # rope frequency index, < 0: not rotated
    rot = r_ok[:, None] & (pair >= 0) & (pair < HALF_RD)
    tok = (rows // H).to(tl.int64)[:, None]
    c = tl.load(cos_ptr + tok * stride_ct + pair, mask=rot, other=1.0)
    s = tl.load(sin_ptr + tok * stride_ct + pair, mask=rot, other=0.0)
    y = tl.reshape(tl.join(even * c - odd * s, even * s + odd * c), (BLOCK_R, BLOCK_D))
    tl.store(o_ptr + rows.to(tl.int64)[:, None] * stride_or + dims[None, :], y.to(o_ptr.dtype.element_ty), mask=ok)


def rmsnorm_rope_triton(
    x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float,
    out: torch.Tensor | None = None, block_r: int = 16,
) -> torch.Tensor:  # fmt: skip
    """Triton version of `rmsnorm_rope_ref` (same contract); grid [ceil(T * H / block_r)]."""
    _check(x, weight, cos, sin)
    o = _output(x, out)
    if x.numel() == 0:
        return o
    d = x.shape[-1]
    heads = x.shape[1] if x.dim() == 3 else 1
    xr = x.contiguous().view(-1, d)
    assert o.is_contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    w = weight.float().contiguous() if weight is not None else cos  # unused placeholder when no weight
    _rmsnorm_rope_kernel[(cdiv(xr.shape[0], block_r),)](
        xr, w, cos, sin, o,
        xr.shape[0], heads, d, cos.shape[1], eps,
        xr.stride(0), d, cos.stride(0),
        BLOCK_R=block_r, BLOCK_D=max(16, next_pow2(d)), HAS_WEIGHT=weight is not None,
    )  # fmt: skip
    return o
