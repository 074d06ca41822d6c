"""Shared checks for the kernel tests: NaN-poisoned outputs and dtype-aware tolerances."""

from __future__ import annotations

import pytest
import torch

from kernels import HAS_TRITON

requires_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not importable, so the Triton kernels cannot run (references are tested)"
)


def poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An output buffer whose every element fails a comparison until the kernel writes it."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype)
    return torch.full(shape, -12345, dtype=dtype)


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float | None = None, atol: float = 1e-5) -> None:
    """fp32: tight; bf16: one ulp (the interpreter truncates fp32 -> bf16 where torch rounds)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert not out.isnan().any(), "unwritten (NaN) elements in the output"
    if rtol is None:
        rtol = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}.get(out.dtype, 1e-5)
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)
