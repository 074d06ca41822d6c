"""Compressor pooling: the Triton kernel (interpreter) vs the torch reference and vs docs/model.md §4.3's
formula written out slot by slot; the reference vs the model's own `Compressor._emit`."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.compressor_pool import compressor_pool_ref, compressor_pool_triton
from tests.kernels.helpers import assert_close, poisoned, requires_triton
from workers.compressor import Compressor
from workers.presets import preset_config

# (n blocks, r ratio, c width, leading blocks that are block 0, block_c, block_r); ratio 4 overlaps
CASES = {
    "csa": (6, 4, 128, 1, 64, 32),  # two channel tiles; the batch's first block is a sequence's block 0
    "hca": (3, 128, 64, 0, 64, 32),  # four row tiles of the online softmax
    "csa-one-block": (1, 4, 64, 0, 64, 32),
    "hca-one-block": (1, 128, 32, 0, 128, 32),  # one partial channel tile
    "csa-ragged": (5, 4, 100, 2, 64, 32),  # n odd, c not a multiple of the tile
    "hca-ragged": (7, 128, 72, 0, 64, 16),  # n odd, c not a multiple of the tile, eight row tiles
    "csa-all-block-0": (3, 4, 64, 3, 32, 32),  # every previous block is (0, -inf)
    "rows-ragged": (3, 12, 40, 0, 64, 8),  # a ratio that is not a multiple of the row tile (masked rows)
}


def _inputs(n: int, r: int, c: int, first: int, seed: int = 0, gathered: bool = True):
    """(kv, score, prev_kv, prev_score); with overlap sliced from one [n, 2r, 2c] gather, as decode reads the ring."""
    g = torch.Generator().manual_seed(seed)
    if r != 4:
        return torch.randn(n, r, c, generator=g), torch.randn(n, r, c, generator=g) * 3, None, None
    rows_kv = torch.randn(n, 2 * r, 2 * c, generator=g)
    rows_score = torch.randn(n, 2 * r, 2 * c, generator=g) * 3
    rows_kv[:first, :r] = 0.0  # block 0: its previous block pools (0, -inf)
    rows_score[:first, :r] = float("-inf")
    views = rows_kv[:, r:], rows_score[:, r:], rows_kv[:, :r], rows_score[:, :r]
    return views if gathered else tuple(t.contiguous() for t in views)


def _spec_pool(kv, score, prev_kv, prev_score) -> torch.Tensor:
    """docs/model.md §4.3 slot by slot in float64: C[ch] = sum_s e^(z_s - max) v_s / sum_s e^(z_s - max)."""
    if prev_kv is None:
        slots = [(kv[:, p], score[:, p]) for p in range(kv.shape[1])]
    else:
        c = kv.shape[2] // 2
        slots = [(prev_kv[:, p, :c], prev_score[:, p, :c]) for p in range(kv.shape[1])]  # "a" half, block j-1
        slots += [(kv[:, p, c:], score[:, p, c:]) for p in range(kv.shape[1])]  # "b" half, block j
    top = torch.stack([z for _, z in slots]).double().amax(0)
    num = sum(torch.exp(z.double() - top) * v.double() for v, z in slots)
    den = sum(torch.exp(z.double() - top) for _, z in slots)
    return (num / den).float()


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_spec_formula(case: str) -> None:
    n, r, c, first, _, _ = CASES[case]
    args = _inputs(n, r, c, first)
    assert_close(compressor_pool_ref(*args), _spec_pool(*args), atol=1e-5)


@pytest.mark.parametrize("ratio_width", [(4, 96), (128, 64)])
def test_reference_is_the_models_emit_pooling(ratio_width: tuple[int, int]) -> None:
    """`Compressor._emit` with its RMSNorm taken out and RoPE at angle 0 returns its pooled entries."""
    r, c = ratio_width
    cfg = preset_config("tiny")
    comp = Compressor(cfg, r, c, rotate=False)
    comp.norm = torch.nn.Identity()
    kv, score, prev_kv, prev_score = _inputs(5, r, c, first=1, seed=3)
    starts = torch.zeros(5, dtype=torch.long)
    inv_freq = torch.zeros(cfg.qk_rope_head_dim // 2)
    want = comp._emit(kv, score, prev_kv, prev_score, starts, inv_freq, False, torch.float32)
    assert_close(compressor_pool_ref(kv, score, prev_kv, prev_score), want, rtol=1e-6, atol=1e-6)


@requires_triton
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_and_spec(case: str) -> None:
    n, r, c, first, block_c, block_r = CASES[case]
    args = _inputs(n, r, c, first, seed=1)
    out = compressor_pool_triton(*args, out=poisoned((n, c), torch.float32), block_c=block_c, block_r=block_r)
    assert_close(out, compressor_pool_ref(*args))
    assert_close(out, _spec_pool(*args), atol=1e-5)


@requires_triton
def test_kernel_contiguous_inputs_and_empty_batch() -> None:
    args = _inputs(4, 4, 48, first=1, seed=2, gathered=False)
    out = compressor_pool_triton(*args, out=poisoned((4, 48), torch.float32), block_c=32)
    assert_close(out, compressor_pool_ref(*args))
    kv, score, _, _ = _inputs(3, 128, 16, first=0)
    wide_kv, wide_score = torch.randn(3, 128, 40), torch.randn(3, 128, 40)
    wide_kv[..., 8:24], wide_score[..., 8:24] = kv, score  # channel-sliced views: rows strided by 40
    out = compressor_pool_triton(wide_kv[..., 8:24], wide_score[..., 8:24], out=poisoned((3, 16), torch.float32))
    assert_close(out, compressor_pool_ref(kv, score))
    empty = compressor_pool_triton(*(t[:0] for t in args))
    assert empty.shape == (0, 48)


def test_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    args = _inputs(*CASES["csa-one-block"][:4], seed=4)
    monkeypatch.setenv("DSV4_KERNELS", "ref")
    assert_close(kernels.compressor_pool(*args), compressor_pool_ref(*args), rtol=0, atol=0)
    if kernels.HAS_TRITON:
        monkeypatch.setenv("DSV4_KERNELS", "triton")
        out = kernels.compressor_pool(*args, out=poisoned((1, 64), torch.float32))
        assert_close(out, compressor_pool_ref(*args))


def test_shape_and_dtype_errors() -> None:
    kv, score, prev_kv, prev_score = _inputs(2, 4, 32, first=0)
    with pytest.raises(ValueError, match="do not fit"):
        compressor_pool_ref(kv, score, prev_kv, None)
    with pytest.raises(ValueError, match="do not fit"):
        compressor_pool_ref(kv, score[:, :3], prev_kv, prev_score)
    with pytest.raises(ValueError, match="float32"):
        compressor_pool_ref(kv.bfloat16(), score, prev_kv, prev_score)
    with pytest.raises(ValueError, match="out must be"):
        compressor_pool_ref(kv, score, prev_kv, prev_score, out=torch.empty(2, 64))
