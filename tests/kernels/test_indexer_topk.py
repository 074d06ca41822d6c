"""Indexer scores + top-k: the Triton kernel (interpreter) vs the torch reference, and the reference
vs the model's `Indexer.select`; both for shared keys (prefill) and per-row paged keys (decode)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import kernels
from kernels.indexer_topk import (
    indexer_topk_paged_ref,
    indexer_topk_paged_triton,
    indexer_topk_ref,
    indexer_topk_triton,
)
from tests.kernels.helpers import poisoned, requires_triton
from workers.indexer import Indexer
from workers.kv_pool import CompressorPool


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


# --- paged keys: one decode query per row, each with its own keys in a paged pool ---

PAD = 1 << 40  # padding pages: any row computed from one is far out of the pool


def _paged(counts: torch.Tensor, c: int, epp: int, exact: bool, seed: int, pad: int = PAD):
    """pool [R, cI] and page_table [B, P] int64: each row's pages in shuffled pool order, spare pages
    (keys no row sees) among them, `pad` past each row's pages (at least one padding page per row)."""
    g = torch.Generator().manual_seed(seed + 100)
    need = [-(-int(n) // epp) for n in counts]
    pages = sum(need) + 3
    order = torch.randperm(pages, generator=g)
    table = torch.full((len(counts), max(need) + 1), pad, dtype=torch.int64)
    for b, used in enumerate(need):
        table[b, :used] = order[sum(need[:b]) : sum(need[: b + 1])]
    if exact:
        return torch.randint(-2, 3, (pages * epp, c), generator=g).float(), table
    return torch.randn(pages * epp, c, generator=g), table


def _row_keys(pool: torch.Tensor, table: torch.Tensor, epp: int, b: int, n: int) -> torch.Tensor:
    """Row b's first n keys, looked up entry by entry [n, cI]."""
    return pool[[int(table[b, j // epp]) * epp + j % epp for j in range(n)]]


def _paged_case(counts: list[int], nh: int, c: int, epp: int, exact: bool, seed: int):
    counts_t = torch.tensor(counts, dtype=torch.int64)
    q, w, _ = _inputs(len(counts), nh, c, 0, exact, seed)
    pool, table = _paged(counts_t, c, epp, exact, seed)
    return q, w, pool, table, counts_t


def _per_row_ref(q, w, pool, table, epp, counts, k) -> torch.Tensor:
    """`indexer_topk_ref` row by row on explicitly gathered keys: the paged contract, spelled out."""
    rows = [indexer_topk_ref(q[b : b + 1], w[b : b + 1], _row_keys(pool, table, epp, b, int(n)), counts[b : b + 1], k)
            for b, n in enumerate(counts)]  # fmt: skip
    return torch.cat(rows)


@pytest.mark.parametrize("exact", [True, False])
def test_paged_reference_matches_per_row_reference_and_model_select(exact: bool) -> None:
    """Ragged counts (none, one, around k, many pages); the model's decode selection reads keys
    through a `CompressorPool` exactly as `Attention._decode` does (padding pages are pool page 0)."""
    epp, k = 4, 8
    q, w, pool, table, counts = _paged_case([0, 1, 7, 8, 9, 21, 33], 4, 16, epp, exact, seed=1)
    table = table.masked_fill(table == PAD, 0)
    expect = _per_row_ref(q, w, pool, table, epp, counts, k)
    for tile in (3, 8, 1024):
        got = indexer_topk_paged_ref(q, w, pool, table, epp, counts, k, out=poisoned((7, k), torch.int32), tile=tile)
        assert torch.equal(got, expect), tile
    keys = CompressorPool(4, 16, 32, torch.float32, 4 * epp, torch.device("cpu"))
    keys.entries = pool
    read = lambda t0, t1: keys.read(table, torch.arange(t0, t1).expand(len(counts), -1))  # noqa: E731
    for tile in (5, 64):
        model = Indexer.select(SimpleNamespace(topk=k, n_heads=4), q, w, counts, read, tile=tile)
        assert torch.equal(expect.long(), model), tile
    assert (expect == -1).any() and (expect[:, -1] >= 0).any()


def test_paged_dispatch_on_cpu_is_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSV4_KERNELS", "auto")
    q, w, pool, table, counts = _paged_case([3, 0, 12], 2, 8, 4, True, seed=2)
    got = kernels.indexer_topk_paged(q, w, pool, table, 4, counts, 5)
    assert torch.equal(got, _per_row_ref(q, w, pool, table, 4, counts, 5))
    assert "indexer_topk_paged" in kernels.__all__


@requires_triton
@pytest.mark.parametrize(
    "nh_c_epp_k_block",
    [
        (16, 32, 8, 16, 64),  # one tile per chunk, two pages per chunk
        (6, 40, 4, 40, 16),  # k not a power of two, 4 tiles per chunk, odd head/channel counts
        (4, 16, 32, 16, 16),  # a page holds two chunks
    ],
)
def test_paged_kernel_exact_scores_with_ties(nh_c_epp_k_block: tuple[int, ...]) -> None:
    """Counts none, one, around k, a chunk and one past it, several pages; pages out of order,
    padding pages (far out of the pool) past every row's own."""
    nh, c, epp, k, block = nh_c_epp_k_block
    kp = max(16, 1 << (k - 1).bit_length())
    counts = sorted({0, 1, k - 1, k, k + 1, kp, kp + 1, 3 * kp - 5})
    q, w, pool, table, counts_t = _paged_case(counts, nh, c, epp, True, seed=nh)
    out = indexer_topk_paged_triton(q, w, pool, table, epp, counts_t, k, out=poisoned((len(counts), k), torch.int32),
                                    block_n=block)  # fmt: skip
    ref = indexer_topk_paged_ref(q, w, pool, table, epp, counts_t, k)
    assert torch.equal(out, ref)
    assert (ref == -1).any() and (ref[:, -1] >= 0).any()  # the cases exercise padding and full rows
    last = _scores(q[-1:], w[-1:], _row_keys(pool, table, epp, len(counts) - 1, counts[-1]))[0]
    assert last[ref[-1].long()].unique().numel() < k  # ... and ties among the picks


@requires_triton
def test_paged_kernel_bf16_random_scores_int32_table() -> None:
    """Float scores from bf16 inputs and an int32 page table: the picks carry the reference's
    top-k scores, best first (rounding may swap near-ties)."""
    epp, k = 8, 20
    q, w, pool, table, counts = _paged_case([0, 5, 19, 20, 21, 70], 8, 32, epp, False, seed=7)
    q, pool, table = q.bfloat16(), pool.bfloat16(), table.clamp(max=2**31 - 1).to(torch.int32)
    out = indexer_topk_paged_triton(q, w, pool, table, epp, counts, k, out=poisoned((6, k), torch.int32), block_n=16)
    ref = indexer_topk_paged_ref(q, w, pool, table, epp, counts, k)
    assert torch.equal(out == -1, ref == -1)
    for b, n in enumerate(counts.tolist()):
        scores = _scores(q[b : b + 1], w[b : b + 1], _row_keys(pool, table, epp, b, n))[0]
        picked, wanted = out[b][out[b] >= 0].long(), ref[b][ref[b] >= 0].long()
        torch.testing.assert_close(scores[picked], scores[wanted], rtol=1e-5, atol=1e-5)


@requires_triton
def test_paged_kernel_single_row_k_past_counts() -> None:
    """One row; k larger than the row's entries and than its page table's reach."""
    q, w, pool, table, counts = _paged_case([11], 4, 16, 4, True, seed=9)
    out = indexer_topk_paged_triton(q, w, pool, table, 4, counts, 24, out=poisoned((1, 24), torch.int32))
    assert torch.equal(out, _per_row_ref(q, w, pool, table, 4, counts, 24))
    assert (out[0, :11] >= 0).all() and (out[0, 11:] == -1).all()
