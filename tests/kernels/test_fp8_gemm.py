"""FP8 block-scaled GEMM: the Triton kernel (interpreter) vs the torch reference; the activation
quantization bit for bit, on hand-picked ties and scale boundaries."""

from __future__ import annotations

import pytest
import torch

from kernels.fp8_gemm import act_quant_dequant_ref, fp8_gemm_ref, fp8_gemm_triton
from kernels.quant import quant_fp8_weight
from tests.kernels.helpers import assert_close, poisoned, requires_triton


def _edge_rows(k: int) -> torch.Tensor:
    """Rows that hit the rounding corners; every 128-block of row 0 has amax 448 (scale 1)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, k, generator=g) * 3
    x[0, :] = torch.tensor([448.0, 9.5, 8.5, -11.0, 2.0**-10, 3 * 2.0**-10, 0.3, -448.0]).repeat(k // 8 + 1)[:k]
    x[1] = torch.randn(k, generator=g) * 1e-7  # amax below the 1e-4 floor
    x[2, :] = 448.0 * 2.0**-3  # amax exactly 448 * 2^-3: scale 2^-3, not 2^-2
    x[3, :] = torch.nextafter(torch.tensor(448.0 * 2.0**-3), torch.tensor(1e9))  # just above: scale 2^-2
    x[4, -1] = 1e4  # the ragged last block has its own scale
    return x


def test_reference_activation_quant_hand_values() -> None:
    x = torch.tensor([[448.0, 9.5, 8.5, -11.0, 2.0**-10, 3 * 2.0**-10, 0.3, 1.0]])
    want = torch.tensor([[448.0, 10.0, 8.0, -11.0, 0.0, 2.0**-8, 0.3125, 1.0]])  # ties to even mantissas
    assert torch.equal(act_quant_dequant_ref(x), want)


@requires_triton
def test_kernel_activation_quant_is_bit_exact() -> None:
    """With an identity weight (e4m3 1.0, scale 1) the GEMM returns the quantized activations."""
    k = 320
    x = _edge_rows(k)
    eye = torch.eye(k).to(torch.float8_e4m3fn)
    out = fp8_gemm_triton(x, eye, torch.ones(3, 3), out=poisoned((6, k), torch.float32))
    assert torch.equal(out, act_quant_dequant_ref(x))


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("e8m0", [True, False])
def test_kernel_matches_reference(dtype: torch.dtype, e8m0: bool) -> None:
    """K = 320 and N = 200: ragged last blocks on both sides; N spans two 128-row scale blocks per tile set."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 320, generator=g) * torch.logspace(-3, 3, 5)[:, None]).to(dtype)
    w, scale = quant_fp8_weight(torch.randn(200, 320, generator=g) * 0.1)
    if not e8m0:
        scale = scale.view(torch.uint8).float().sub(127).exp2()
    out = fp8_gemm_triton(x, w, scale, out=poisoned((5, 200), dtype))
    ref = fp8_gemm_ref(x, w, scale)
    assert_close(out, ref, atol=1e-3 * float(ref.float().abs().max()))


@requires_triton
def test_kernel_single_token_and_empty_batch() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 256, generator=g).bfloat16()
    w, scale = quant_fp8_weight(torch.randn(64, 256, generator=g))
    assert_close(fp8_gemm_triton(x, w, scale, out=poisoned((1, 64), torch.bfloat16)), fp8_gemm_ref(x, w, scale))
    assert fp8_gemm_triton(x[:0], w, scale).shape == (0, 64)
