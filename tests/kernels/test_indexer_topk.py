"""Indexer scores + top-k: the Triton kernel (interpreter) vs the torch reference, and the reference
vs the model's `Indexer.select`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kernels.indexer_topk import indexer_topk_ref, indexer_topk_triton
from tests.kernels.helpers import poisoned, requires_triton
from workers.attention import Indexer


def _inputs(t: int, nh: int, c: int, n: int, exact: bool, seed: int = 0):
    """exact: small integers, so every score is exact in fp32 in any order and ties are common."""
    g = torch.Generator().manual_seed(seed)
    if exact:
        q = torch.randint(-2, 3, (t, nh, c), generator=g).float()
        keys = torch.randint(-2, 3, (n, c), generator=g).float()
        w = torch.randint(-2, 3, (t, nh), generator=g).float()
    else:
        q, keys, w = torch.randn(t, nh, c, generator=g), torch.randn(n, c, generator=g), torch.randn(t, nh, generator=g)
    return q, w, keys


def _scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return torch.einsum("shn,sh->sn", torch.einsum("shc,nc->shn", q.float(), keys.float()).relu(), w.float())


def _visible(n: int, k: int, kp: int) -> torch.Tensor:
    """Edge lengths: none, one, around k, exactly a chunk (next_pow2(k)) and one past it, all."""
    return torch.tensor(sorted({0, 1, k - 1, k, k + 1, kp, kp + 1, n - 1, n}), dtype=torch.int32).clamp(max=n)


@pytest.mark.parametrize("exact", [True, False])
def test_reference_matches_model_select(exact: bool) -> None:
    """`Indexer.select` (tiled running top-k) with positions p sees entries j < (p + 1) // 4;
    same picks as the reference for any tile."""
    q, w, keys = _inputs(12, 4, 16, 30, exact)
    counts = (torch.arange(12) * 9 + 3 + 1) // 4
    ref = indexer_topk_ref(q, w, keys, counts.to(torch.int32), 8)
    for tile in (3, 7, 30):
        model = Indexer.select(SimpleNamespace(topk=8, n_heads=4), q, w, counts, lambda a, b: keys[a:b], tile=tile)
        assert torch.equal(ref.long(), model), tile


@requires_triton
@pytest.mark.parametrize(
    "t_nh_c_n_k_block",
    [
        (4, 16, 32, 100, 16, 64),  # one tile per chunk
        (4, 6, 40, 90, 40, 16),  # k not a power of two, 4 tiles per chunk, odd head/channel counts
        (1, 4, 16, 10, 16, 64),  # single query, k > N
    ],
)
def test_kernel_exact_scores_with_ties(t_nh_c_n_k_block: tuple[int, ...]) -> None:
    t, nh, c, n, k, block = t_nh_c_n_k_block
    kp = max(16, 1 << (k - 1).bit_length())
    vis = _visible(n, k, kp)
    q, w, keys = _inputs(len(vis), nh, c, n, exact=True, seed=t)
    out = indexer_topk_triton(q, w, keys, vis, k, out=poisoned((len(vis), k), torch.int32), block_n=block)
    ref = indexer_topk_ref(q, w, keys, vis, k)
    assert torch.equal(out, ref)
    assert (ref == -1).any() and (_scores(q, w, keys) == 0).any()  # the cases exercise padding and ties


@requires_triton
def test_kernel_random_scores() -> None:
    """Float scores: the picks carry the reference's top-k scores, best first (rounding may swap near-ties)."""
    n, k = 130, 20
    vis = _visible(n, k, 32)
    q, w, keys = _inputs(len(vis), 8, 32, n, exact=False, seed=3)
    out = indexer_topk_triton(q, w, keys, vis, k, out=poisoned((len(vis), k), torch.int32), block_n=16)
    ref = indexer_topk_ref(q, w, keys, vis, k)
    assert torch.equal(out == -1, ref == -1)
    scores = _scores(q, w, keys)
    picked = torch.where(out >= 0, scores.gather(1, out.clamp(min=0).long()), 0.0)
    wanted = torch.where(ref >= 0, scores.gather(1, ref.clamp(min=0).long()), 0.0)
    torch.testing.assert_close(picked, wanted, rtol=1e-5, atol=1e-5)
    assert (out < vis[:, None]).all()


@requires_triton
def test_kernel_bf16_inputs_and_empty_keys() -> None:
    q, w, keys = _inputs(3, 4, 32, 40, exact=True, seed=5)
    vis = torch.tensor([40, 17, 16], dtype=torch.int32)
    out = indexer_topk_triton(q.bfloat16(), w, keys.bfloat16(), vis, 16, out=poisoned((3, 16), torch.int32))
    assert torch.equal(out, indexer_topk_ref(q, w, keys, vis, 16))
    none = indexer_topk_triton(q, w, keys[:0], vis, 4, out=poisoned((3, 4), torch.int32))
    assert (none == -1).all() and torch.equal(none, indexer_topk_ref(q, w, keys[:0], vis, 4))
