"""Number formats of DeepSeek-V4 checkpoints and the in-forward QAT simulation (docs/model.md §8).

Pure torch, vectorised, device-agnostic. Legend: `out`/`in` are a weight's output and input
dims, `n` is the length of the last dim, `...` any leading dims.

Formats:
- e4m3 (`torch.float8_e4m3fn`): FP8 weights, max finite 448.
- ue8m0 (`torch.float8_e8m0fnu`, or its raw `uint8` byte b): a power of two, 2^(b-127).
- e2m1 (FP4): nibble code -> value table `E2M1_VALUES`, two codes per byte, the LOW nibble
  holding the EVEN element. Stored as `uint8`/`int8`/`torch.float4_e2m1fn_x2`; torch cannot
  convert float4 on CPU, so we unpack nibbles ourselves.

Weight layouts: FP8 weights carry one scale per 128x128 block
`[ceil(out/128), ceil(in/128)]` (ragged last blocks allowed); FP4 weights carry one ue8m0
scale per 32 values along `in`: `[out, in/32]`. All scales are powers of two.
"""

from __future__ import annotations

import torch

E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                                  -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
FP8_WEIGHT_BLOCK = 128
FP4_WEIGHT_BLOCK = 32
FP8_AMAX_FLOOR = 1e-4
FP4_AMAX_FLOOR = 6.0 * 2.0**-126
# Midpoints between consecutive e2m1 magnitudes; a tie goes to the even code, i.e. down at
# even-indexed midpoints (0.25, 1.25, 2.5, 5) and up at odd-indexed ones (0.75, 1.75, 3.5).
_E2M1_TIES_DOWN = (0.25, 1.25, 2.5, 5.0)
_E2M1_TIES_UP = (0.75, 1.75, 3.5)
_PACKED_FP4_DTYPES = (torch.uint8, torch.int8, torch.float4_e2m1fn_x2)


# ---------------------------------------------------------------------------- e2m1 (FP4)

def e2m1_code(x: torch.Tensor) -> torch.Tensor:
    """Round `x` [...] to the nearest e2m1 value (ties to even, |x| > 6 saturates) -> uint8 codes [...]."""
    mag = x.float().abs()
    down = torch.tensor(_E2M1_TIES_DOWN, device=x.device)
    up = torch.tensor(_E2M1_TIES_UP, device=x.device)
    # code = #(tie-down midpoints strictly below |x|) + #(tie-up midpoints at or below |x|)
    code = torch.bucketize(mag, down, right=False) + torch.bucketize(mag, up, right=True)
    sign = torch.signbit(x).to(torch.uint8) << 3
    return code.to(torch.uint8) | sign


def e2m1_value(code: torch.Tensor) -> torch.Tensor:
    """Nibble codes [...] (any integer dtype, values 0..15) -> float32 values [...]."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=code.device)
    return table[code.long()]


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round `x` [...] to the nearest e2m1 value (ties to even, saturating at ±6) -> float32 [...].

    Arithmetic form of e2m1_value(e2m1_code(x)) (the hot path of the FP4 simulation): the
    grid has step 0.5 below 2, 1 below 4 and 2 up to 6, and an e2m1 code is even exactly
    where value / step is even, so torch.round (half to even) on value / step rounds ties
    to the even code. Exact: scaling by a power of two loses nothing."""
    xf = x.float()
    mag = xf.abs().clamp(max=E2M1_MAX)
    step = torch.where(mag < 2.0, 0.5, torch.where(mag < 4.0, 1.0, 2.0))
    return torch.copysign(torch.round(mag / step) * step, xf)


def pack_fp4(x: torch.Tensor) -> torch.Tensor:
    """Round float `x` [..., n] to e2m1 and pack pairs -> uint8 [..., n/2] (low nibble = even element)."""
    if x.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dim, got shape {tuple(x.shape)}")
    codes = e2m1_code(x).unflatten(-1, (-1, 2))  # [..., n/2, 2]
    return codes[..., 0] | (codes[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 pairs [..., n/2] (uint8, int8 or float4_e2m1fn_x2) -> float32 [..., n]."""
    if packed.dtype not in _PACKED_FP4_DTYPES:
        raise ValueError(f"unpack_fp4 expects one of {_PACKED_FP4_DTYPES}, got {packed.dtype}")
    raw = packed.view(torch.uint8)
    codes = torch.stack((raw & 0xF, raw >> 4), dim=-1)  # [..., n/2, 2]
    return e2m1_value(codes.flatten(-2))


# ---------------------------------------------------------------------------- ue8m0 scales

def ceil_log2(y: torch.Tensor) -> torch.Tensor:
    """Exact ceil(log2(y)) for positive finite float `y` [...] -> int32 [...] (no log2 rounding)."""
    mant, exp = torch.frexp(y.float())  # y = mant * 2^exp, mant in [0.5, 1)
    return torch.where(mant == 0.5, exp - 1, exp)


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Integer exponents k [...] -> float32 2^k [...] (exact, subnormals included)."""
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent.float())


def e8m0_from_exponent(exponent: torch.Tensor) -> torch.Tensor:
    """Integer exponents k in [-127, 127] [...] -> float8_e8m0fnu [...] holding 2^k (byte k + 127)."""
    if exponent.numel() and (exponent.min() < -127 or exponent.max() > 127):
        raise ValueError("ue8m0 exponent out of range [-127, 127]")
    return (exponent.to(torch.int32) + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def float_to_e8m0(x: torch.Tensor) -> torch.Tensor:
    """Positive float `x` [...] -> float8_e8m0fnu [...]; exact for powers of two, otherwise rounds up."""
    return e8m0_from_exponent(ceil_log2(x))


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """ue8m0 scales [...] (float8_e8m0fnu or raw uint8 bytes b) -> float32 2^(b-127) [...]."""
    if scale.dtype not in (torch.float8_e8m0fnu, torch.uint8):
        raise ValueError(f"e8m0_to_float expects float8_e8m0fnu or uint8, got {scale.dtype}")
    byte = scale.view(torch.uint8).to(torch.int32)
    value = pow2(byte - 127)
    return torch.where(byte == 255, torch.full_like(value, float("nan")), value)


def scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    """A weight scale [...] stored as ue8m0 (e8m0fnu or uint8) or as a float dtype -> float32 [...]."""
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        return e8m0_to_float(scale)
    if scale.is_floating_point():
        return scale.float()
    raise ValueError(f"unsupported scale dtype {scale.dtype}")


def _block_scale(amax: torch.Tensor, qmax: float, floor: float) -> torch.Tensor:
    """Power-of-two scale 2^ceil(log2(max(amax, floor) / qmax)) -> int32 exponents."""
    return ceil_log2(amax.clamp_min(floor) / qmax)


# ---------------------------------------------------------------------------- FP8 weights

def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """[out, in] -> [ceil(out/b)*b, ceil(in/b)*b], zero padded."""
    out_dim, in_dim = w.shape
    return torch.nn.functional.pad(w, (0, -in_dim % block, 0, -out_dim % block))


def dequant_fp8_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 e4m3 weight [out, in] with block scale [ceil(out/128), ceil(in/128)] -> float32 [out, in].

    The scale may be ue8m0 (float8_e8m0fnu / uint8) or float32; ragged last blocks are allowed.
    """
    if w.dim() != 2:
        raise ValueError(f"FP8 weight must be 2-D, got shape {tuple(w.shape)}")
    out_dim, in_dim = w.shape
    b = FP8_WEIGHT_BLOCK
    want = (-(-out_dim // b), -(-in_dim // b))
    if tuple(scale.shape) != want:
        raise ValueError(f"FP8 scale shape {tuple(scale.shape)} != {want} for weight {tuple(w.shape)}")
    s = scale_to_float(scale)
    s_full = s.repeat_interleave(b, dim=0)[:out_dim].repeat_interleave(b, dim=1)[:, :in_dim]
    return w.float() * s_full


def quant_fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float weight [out, in] -> (e4m3 [out, in], ue8m0 scale [ceil(out/128), ceil(in/128)]).

    Per 128x128 block: s = 2^ceil(log2(max(amax, 1e-4) / 448)), q = e4m3(clamp(w / s, ±448)).
    """
    if w.dim() != 2:
        raise ValueError(f"FP8 weight must be 2-D, got shape {tuple(w.shape)}")
    out_dim, in_dim = w.shape
    b = FP8_WEIGHT_BLOCK
    padded = _pad_to_blocks(w.float(), b)
    blocks = padded.unflatten(0, (-1, b)).unflatten(2, (-1, b))  # [ob, 128, ib, 128]
    exponent = _block_scale(blocks.abs().amax(dim=(1, 3)), E4M3_MAX, FP8_AMAX_FLOOR)  # [ob, ib]
    s = pow2(exponent)[:, None, :, None]
    q = (blocks / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.flatten(2).flatten(0, 1)[:out_dim, :in_dim].contiguous()
    return q, e8m0_from_exponent(exponent)


# ---------------------------------------------------------------------------- FP4 weights

def dequant_fp4_weight(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 weight [out, in/2] with ue8m0 scale [out, in/32] -> float32 [out, in]."""
    if packed.dim() != 2:
        raise ValueError(f"FP4 weight must be 2-D, got shape {tuple(packed.shape)}")
    out_dim, half_in = packed.shape
    want = (out_dim, half_in * 2 // FP4_WEIGHT_BLOCK)
    if half_in * 2 % FP4_WEIGHT_BLOCK or tuple(scale.shape) != want:
        raise ValueError(f"FP4 scale shape {tuple(scale.shape)} != {want} for packed {tuple(packed.shape)}")
    values = unpack_fp4(packed).unflatten(1, (-1, FP4_WEIGHT_BLOCK))  # [out, in/32, 32]
    return (values * scale_to_float(scale)[..., None]).flatten(1)


def quant_fp4_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float weight [out, in] (in % 32 == 0) -> (packed uint8 [out, in/2], ue8m0 scale [out, in/32]).

    Per 32 values along `in`: s = 2^ceil(log2(amax / 6)) (amax floored at 6 * 2^-126),
    q = e2m1(w / s) with ties to even.
    """
    if w.dim() != 2 or w.shape[1] % FP4_WEIGHT_BLOCK:
        raise ValueError(f"FP4 weight must be 2-D with in % 32 == 0, got shape {tuple(w.shape)}")
    blocks = w.float().unflatten(1, (-1, FP4_WEIGHT_BLOCK))  # [out, in/32, 32]
    exponent = _block_scale(blocks.abs().amax(dim=-1), E2M1_MAX, FP4_AMAX_FLOOR)  # [out, in/32]
    packed = pack_fp4((blocks / pow2(exponent)[..., None]).flatten(1))
    return packed, e8m0_from_exponent(exponent)


# ---------------------------------------------------------------------------- QAT simulation

def _blocks_last(x: torch.Tensor, block: int) -> torch.Tensor:
    """[..., n] -> float32 [..., n/block, block]."""
    if x.shape[-1] % block:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of block {block}")
    return x.float().unflatten(-1, (-1, block))


def fp8_qdq(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Simulate FP8 e4m3 quant->dequant of `x` [..., n] per `block` along the last dim -> x.dtype [..., n].

    s = 2^ceil(log2(max(amax, 1e-4) / 448)); y = e4m3(clamp(x / s, ±448)) * s, in float32.
    """
    blocks = _blocks_last(x, block)  # [..., n/block, block]
    s = pow2(_block_scale(blocks.abs().amax(dim=-1, keepdim=True), E4M3_MAX, FP8_AMAX_FLOOR))
    q = (blocks / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    return (q * s).flatten(-2).to(x.dtype)


def fp4_qdq(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Simulate FP4 e2m1 quant->dequant of `x` [..., n] per `block` along the last dim -> x.dtype [..., n].

    s = 2^ceil(log2(max(amax, 6 * 2^-126) / 6)); y = round_e2m1(clamp(x / s, ±6)) * s, in float32.
    """
    blocks = _blocks_last(x, block)  # [..., n/block, block]
    s = pow2(_block_scale(blocks.abs().amax(dim=-1, keepdim=True), E2M1_MAX, FP4_AMAX_FLOOR))
    q = round_e2m1((blocks / s).clamp(-E2M1_MAX, E2M1_MAX))
    return (q * s).flatten(-2).to(x.dtype)


def act_qdq(x: torch.Tensor) -> torch.Tensor:
    """The activation quant before an FP8/FP4 GEMM (docs/model.md §8) as quant->dequant: per token
    (row) and 128-channel block of x [..., K] (a ragged last block counts only its
    channels), s = 2^ceil(log2(max(amax, 1e-4) / 448)), x_q = e4m3(clamp(x / s, ±448)) * s;
    returned in x's dtype (exact in bf16: e4m3 values times a power of two)."""
    k = x.shape[-1]
    padded = torch.nn.functional.pad(x.float(), (0, -k % FP8_WEIGHT_BLOCK))
    return fp8_qdq(padded, FP8_WEIGHT_BLOCK)[..., :k].to(x.dtype)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Normalised Walsh-Hadamard transform of `x` [..., n] (n a power of two) -> x.dtype [..., n].

    y = x @ H_n^T * n^-0.5 with Sylvester ordering H_2n = [[H, H], [H, -H]] (as in
    fast_hadamard_transform), computed in float32 by an O(n log n) butterfly.
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard needs a power-of-two last dim, got {n}")
    y = x.float()
    h = 1
    while h < n:
        pairs = y.unflatten(-1, (-1, 2, h))  # [..., n/2h, 2, h]
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).flatten(-3)
        h *= 2
    return (y * n**-0.5).to(x.dtype)
