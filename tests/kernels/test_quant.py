"""Number formats (kernels/quant.py) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.quant import (
    dequant_fp4_weight,
    dequant_fp8_weight,
    e2m1_code,
    e2m1_value,
    e8m0_from_exponent,
    e8m0_to_float,
    float_to_e8m0,
    fp4_qdq,
    fp8_qdq,
    hadamard,
    pack_fp4,
    quant_fp4_weight,
    quant_fp8_weight,
    round_e2m1,
    unpack_fp4,
)

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _fp4_scales(w: torch.Tensor) -> torch.Tensor:
    """Hand reference: 2^ceil(log2(amax/6)) per 32 along the last dim, with math.frexp."""
    out = []
    for amax in w.abs().unflatten(-1, (-1, 32)).amax(-1).flatten().tolist():
        mant, exp = math.frexp(max(amax, 6 * 2.0**-126) / 6)
        out.append(2.0 ** (exp - 1 if mant == 0.5 else exp))
    return torch.tensor(out).reshape(*w.shape[:-1], -1)


# ---------------------------------------------------------------------------- e2m1


def test_unpack_table_and_nibble_order() -> None:
    # byte k holds code 2k in the low nibble (even element) and 2k+1 in the high nibble
    packed = torch.tensor([[(2 * k) | ((2 * k + 1) << 4) for k in range(8)]], dtype=torch.uint8)
    got = unpack_fp4(packed)
    assert got.dtype == torch.float32 and got.shape == (1, 16)
    assert got[0].tolist() == E2M1
    assert torch.signbit(got[0, 8])  # code 8 is -0


def test_unpack_accepts_int8_and_float4_views() -> None:
    byte = torch.tensor([0xC2], dtype=torch.uint8)  # low nibble 2 -> 1.0, high nibble 12 -> -2.0
    for view in (byte, byte.view(torch.int8), byte.view(torch.float4_e2m1fn_x2)):
        assert unpack_fp4(view).tolist() == [1.0, -2.0]
    with pytest.raises(ValueError):
        unpack_fp4(torch.tensor([1.0]))


def test_pack_nibble_order_by_hand() -> None:
    packed = pack_fp4(torch.tensor([[1.0, -2.0, 6.0, 0.5]]))
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0xC2, 0x17]]
    with pytest.raises(ValueError):
        pack_fp4(torch.ones(3))


@pytest.mark.parametrize(
    ("x", "want"),
    [
        (0.25, 0.0), (0.26, 0.5), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0),
        (5.0, 4.0), (5.01, 6.0), (7.0, 6.0), (1e9, 6.0), (0.1, 0.0), (2.9, 3.0), (1.3, 1.5),
        (-0.75, -1.0), (-2.5, -2.0), (-5.0, -4.0), (-100.0, -6.0),
    ],
)
def test_round_e2m1_ties_to_even(x: float, want: float) -> None:
    assert round_e2m1(torch.tensor([x])).item() == want
    assert unpack_fp4(pack_fp4(torch.tensor([x, -x]))).tolist() == [want, -want]


def test_round_e2m1_arithmetic_form_equals_the_code_table() -> None:
    """round_e2m1 (arithmetic, the hot path) against e2m1_value(e2m1_code(x)) (the midpoint
    table): a dense grid, every midpoint and its float32 neighbours, both signs."""
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 2.0, 4.0, 6.0])
    near = torch.cat((mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)))
    x = torch.cat((torch.linspace(0, 7, 70001), near, torch.tensor([1e-30, 1e30])))
    x = torch.cat((x, -x))
    assert torch.equal(round_e2m1(x), e2m1_value(e2m1_code(x)))


def test_pack_unpack_roundtrip_exact_on_representable_values() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor(E2M1)[torch.randint(0, 16, (5, 64), generator=gen)]
    assert torch.equal(unpack_fp4(pack_fp4(x)), x)


# ---------------------------------------------------------------------------- ue8m0


def test_e8m0_bytes_by_hand() -> None:
    raw = torch.tensor([127, 128, 126, 130, 0, 254], dtype=torch.uint8)
    want = [1.0, 2.0, 0.5, 8.0, 2.0**-127, 2.0**127]
    assert e8m0_to_float(raw).tolist() == want
    assert e8m0_to_float(raw.view(torch.float8_e8m0fnu)).tolist() == want
    assert math.isnan(e8m0_to_float(torch.tensor([255], dtype=torch.uint8)).item())


def test_float_to_e8m0_bytes() -> None:
    s = float_to_e8m0(torch.tensor([1.0, 2.0, 0.5, 2.0**-20, 3.0, 0.3]))
    assert s.dtype == torch.float8_e8m0fnu
    # powers of two exactly; others round up (3 -> 4, 0.3 -> 0.5)
    assert s.view(torch.uint8).tolist() == [127, 128, 126, 107, 129, 126]
    assert e8m0_from_exponent(torch.tensor([-127, 0, 127])).view(torch.uint8).tolist() == [0, 127, 254]
    with pytest.raises(ValueError):
        e8m0_from_exponent(torch.tensor([128]))


# ---------------------------------------------------------------------------- QAT simulation


def test_fp8_qdq_e4m3_rounding_unit_scale() -> None:
    # amax 448 -> s = 2^ceil(log2(1)) = 1, so the output is plain e4m3 rounding
    x = torch.zeros(64)
    x[:8] = torch.tensor([448.0, 1.0625, 1.1875, 17.0, 19.0, 2.0**-9, 2.0**-10, -300.0])
    want = [448.0, 1.0, 1.25, 16.0, 20.0, 2.0**-9, 0.0, -288.0]
    y = fp8_qdq(x)
    assert y[:8].tolist() == want
    assert not y[8:].any()


def test_fp8_qdq_block_scales_by_hand() -> None:
    x = torch.zeros(2, 128)
    x[0, :3] = torch.tensor([900.0, 3.0, -0.5])  # block 0: 900/448 -> s = 4
    x[0, 64] = 896.0  # block 1: 896/448 = 2 exactly -> s = 2
    x[0, 65] = 3.0  # 3 / 2 = 1.5 exact
    x[1, :2] = torch.tensor([1e-6, -1e-6])  # amax floored at 1e-4 -> s = 2^-22
    y = fp8_qdq(x)
    assert y[0, :3].tolist() == [896.0, 3.0, -0.5]  # 900/4 = 225 -> 224
    assert y[0, 64:66].tolist() == [896.0, 3.0]
    assert y[1, :2].tolist() == [4.0 * 2.0**-22, -4.0 * 2.0**-22]  # 1e-6 * 2^22 = 4.19 -> 4
    assert not y[1, 64:].any()  # all-zero block stays zero


def test_fp8_qdq_keeps_dtype_and_block_arg() -> None:
    x = torch.tensor([[900.0] + [0.0] * 63] * 2).bfloat16()
    y = fp8_qdq(x, block=32)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert y[0, 0].item() == 896.0
    with pytest.raises(ValueError):
        fp8_qdq(torch.ones(48))


def test_fp4_qdq_block_scales_by_hand() -> None:
    x = torch.zeros(96)
    x[:4] = torch.tensor([12.0, 5.0, 7.0, -1.5])  # amax 12 -> s = 2
    x[32:34] = torch.tensor([13.0, 2.0])  # 13/6 -> s = 4
    y = fp4_qdq(x)
    assert y[:4].tolist() == [12.0, 4.0, 8.0, -2.0]  # 5/2 = 2.5 -> 2 (tie), 7/2 = 3.5 -> 4
    assert y[32:34].tolist() == [12.0, 2.0]  # 13/4 = 3.25 -> 3
    assert not y[64:].any()
    assert fp4_qdq(x.half()).dtype == torch.float16


def test_fp4_qdq_random_matches_hand_scales() -> None:
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    s = _fp4_scales(x).repeat_interleave(32, dim=-1)
    y = fp4_qdq(x)
    assert torch.equal(y / s, round_e2m1(x / s))  # every output is e2m1 value x its block scale
    assert ((y - x).abs() <= torch.maximum(0.25 * s, x.abs() / 4)).all()


# ---------------------------------------------------------------------------- Hadamard


def test_hadamard_hand_rows() -> None:
    e0 = torch.tensor([1.0, 0.0, 0.0, 0.0])
    e1 = torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert hadamard(e0).tolist() == [0.5, 0.5, 0.5, 0.5]
    assert hadamard(e1).tolist() == [0.5, -0.5, 0.5, -0.5]


@pytest.mark.parametrize("n", [1, 2, 8, 128])
def test_hadamard_matches_sylvester_and_is_involution(n: int) -> None:
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n))
    want = x @ _sylvester(n).T / math.sqrt(n)
    torch.testing.assert_close(hadamard(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hadamard(hadamard(x)), x, atol=1e-5, rtol=1e-5)


def test_hadamard_dtype_and_bad_size() -> None:
    x = torch.randn(2, 32).bfloat16()
    assert hadamard(x).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        hadamard(torch.ones(2, 12))


# ---------------------------------------------------------------------------- FP8 weights


def test_dequant_fp8_ragged_blocks_by_hand() -> None:
    w = torch.ones(130, 129).to(torch.float8_e4m3fn)
    scale = torch.tensor([[127, 128], [129, 130]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    for s in (scale, torch.tensor([[1.0, 2.0], [4.0, 8.0]])):
        y = dequant_fp8_weight(w, s)
        assert y.shape == (130, 129) and y.dtype == torch.float32
        assert (y[:128, :128] == 1).all() and (y[:128, 128:] == 2).all()
        assert (y[128:, :128] == 4).all() and (y[128:, 128:] == 8).all()
    with pytest.raises(ValueError):
        dequant_fp8_weight(w, torch.ones(1, 2))


def test_quant_fp8_weight_random_error_bound_and_scales() -> None:
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(2)) * 3
    q, s = quant_fp8_weight(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (300, 200)
    assert s.dtype == torch.float8_e8m0fnu and s.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            amax = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].abs().max().item()
            assert e8m0_to_float(s[i, j]).item() == 2.0 ** math.ceil(math.log2(amax / 448))
    s_full = e8m0_to_float(s).repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    err = (dequant_fp8_weight(q, s) - w).abs()
    assert (err <= torch.maximum(w.abs() / 16, s_full * 2.0**-10)).all()  # 3 mantissa bits
    assert err.max() > 0  # random values are not all representable


def test_quant_fp8_weight_exact_for_representable_and_zero_blocks() -> None:
    gen = torch.Generator().manual_seed(3)
    q = (torch.randn(200, 140, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    q[0, 0] = q[0, 128] = q[128, 0] = q[128, 128] = 448.0  # every block's amax is 448 * its scale
    block_scale = torch.tensor([[2.0**-3, 2.0**5], [1.0, 2.0**-20]])
    w = q * block_scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :140]
    qq, s = quant_fp8_weight(w)
    assert e8m0_to_float(s).tolist() == block_scale.tolist()
    assert torch.equal(dequant_fp8_weight(qq, s), w)
    qz, sz = quant_fp8_weight(torch.zeros(10, 10))
    assert not dequant_fp8_weight(qz, sz).any()


# ---------------------------------------------------------------------------- FP4 weights


def test_dequant_fp4_weight_by_hand() -> None:
    packed = torch.full((2, 16), 0x21, dtype=torch.uint8)  # even 0.5, odd 1.0
    scale = torch.tensor([[128], [125]], dtype=torch.uint8).view(torch.float8_e8m0fnu)  # 2, 1/4
    y = dequant_fp4_weight(packed.view(torch.int8), scale)
    assert y.shape == (2, 32)
    assert y[0].tolist() == [1.0, 2.0] * 16 and y[1].tolist() == [0.125, 0.25] * 16
    with pytest.raises(ValueError):
        dequant_fp4_weight(packed, torch.ones(2, 2))


def test_quant_fp4_weight_random_error_bound_and_scales() -> None:
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(4)) / 7
    packed, s = quant_fp4_weight(w)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 48)
    assert s.dtype == torch.float8_e8m0fnu and s.shape == (24, 3)
    want_s = _fp4_scales(w)
    assert torch.equal(e8m0_to_float(s), want_s)
    s_full = want_s.repeat_interleave(32, dim=1)
    err = (dequant_fp4_weight(packed, s) - w).abs()
    assert (err <= torch.maximum(0.25 * s_full, w.abs() / 4)).all()
    assert err.max() > 0


def test_quant_fp4_weight_exact_for_representable() -> None:
    gen = torch.Generator().manual_seed(5)
    codes = torch.tensor(E2M1)[torch.randint(0, 16, (8, 64), generator=gen)]
    codes[:, ::32] = -6.0  # amax 6 in every block
    w = codes * (2.0 ** torch.randint(-10, 10, (8, 2), generator=gen).float()).repeat_interleave(32, 1)
    packed, s = quant_fp4_weight(w)
    assert torch.equal(dequant_fp4_weight(packed, s), w)
    with pytest.raises(ValueError):
        quant_fp4_weight(torch.ones(4, 48))
