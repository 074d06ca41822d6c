"""FP4 grouped expert GEMM: the Triton kernel (interpreter) vs the torch reference, and the reference vs
the model's `grouped_linear` on dequantized weights."""

from __future__ import annotations

import pytest
import torch

from kernels.fp4_grouped_gemm import fp4_grouped_gemm_ref, fp4_grouped_gemm_triton
from kernels.quant import dequant_fp4_weight
from tests.kernels.helpers import assert_close, poisoned, requires_triton
from workers.moe import grouped_linear


def _inputs(counts: list[int], n: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p, e = sum(counts), len(counts)
    x = torch.randn(p, k, generator=g).to(dtype)
    packed = torch.randint(0, 256, (e, n, k // 2), generator=g, dtype=torch.uint8)  # every nibble, -0 included
    scale = torch.randint(120, 131, (e, n, k // 32), generator=g, dtype=torch.uint8)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)
    return x, packed, scale, offsets


def test_reference_matches_model_grouped_linear() -> None:
    counts = [3, 0, 5, 1]
    x, packed, scale, offsets = _inputs(counts, 24, 64, torch.float32)
    w = torch.stack([dequant_fp4_weight(packed[e], scale[e]) for e in range(len(counts))])
    want = grouped_linear(x, w, torch.tensor(counts))
    assert_close(fp4_grouped_gemm_ref(x, packed, scale, offsets), want, atol=1e-4)


def test_reference_rejects_bad_offsets() -> None:
    x, packed, scale, offsets = _inputs([2, 2], 8, 32, torch.float32)
    with pytest.raises(ValueError, match="offsets must rise"):
        fp4_grouped_gemm_ref(x, packed, scale, torch.tensor([0, 3, 2]))
    with pytest.raises(ValueError, match="do not fit"):
        fp4_grouped_gemm_ref(x[:, :16], packed, scale, offsets)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_ragged_groups_with_empty_experts(dtype: torch.dtype) -> None:
    """Groups of 3, 0, 17 (two row tiles), 1 and 0 rows; K = 96 and N = 40 leave ragged last tiles."""
    x, packed, scale, offsets = _inputs([3, 0, 17, 1, 0], 40, 96, dtype, seed=1)
    out = fp4_grouped_gemm_triton(x, packed, scale, offsets, out=poisoned((21, 40), dtype), block_n=32, block_k=64)
    assert_close(out, fp4_grouped_gemm_ref(x, packed, scale, offsets), atol=1e-3)


@requires_triton
def test_kernel_single_token_e8m0_scales_and_empty_batch() -> None:
    x, packed, scale, offsets = _inputs([0, 1], 16, 64, torch.float32, seed=2)
    e8m0 = scale.view(torch.float8_e8m0fnu)
    out = fp4_grouped_gemm_triton(x, packed, e8m0, offsets, out=poisoned((1, 16), torch.float32))
    assert_close(out, fp4_grouped_gemm_ref(x, packed, e8m0, offsets), atol=1e-4)
    empty = fp4_grouped_gemm_triton(x[:0], packed, scale, torch.zeros(3, dtype=torch.int64))
    assert empty.shape == (0, 16)
