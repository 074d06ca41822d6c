"""Sparse attention with sink: the Triton kernel (interpreter) vs the torch reference, and the
reference vs an independent per-query softmax over [logits | sink]."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import kernels
from kernels.sparse_attention import sparse_attention_ref, sparse_attention_triton
from tests.kernels.helpers import assert_close, poisoned, requires_triton
from workers.attention import Attention

# (T queries, H heads, D dim, N kv rows, L gathered per query, dtype)
CASES = {
    "decode": (4, 16, 64, 40, 48, torch.float32),
    "prefill-ragged": (9, 20, 48, 33, 70, torch.bfloat16),  # two head blocks, D not a power of two
    "single-token": (1, 4, 32, 5, 3, torch.float32),
}


def _inputs(t: int, h: int, d: int, n: int, length: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, h, d, generator=g).to(dtype)
    kv = torch.randn(n, d, generator=g).to(dtype)
    idx = torch.randint(-1, n, (t, length), generator=g, dtype=torch.int32)
    idx[-1, -1] = n - 1  # the last row
    if t > 2:
        idx[0, :] = -1  # a query with nothing to attend to: zeros
        idx[1, :] = n - 1  # one row, repeated
    sink = torch.randn(h, generator=g) * 2
    return q, kv, idx, sink, d**-0.5


def _naive(q, kv, idx, sink, scale):
    """Per query and head: softmax over [logits of valid rows | sink], the sink column dropped."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    for t in range(q.shape[0]):
        rows = idx[t][idx[t] >= 0].long()
        keys = kv[rows].float()
        for h in range(q.shape[1]):
            logits = torch.cat((keys @ q[t, h].float() * scale, sink[h : h + 1].float()))
            out[t, h] = logits.softmax(0)[:-1] @ keys
    return out.to(q.dtype)


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_naive_softmax(case: str) -> None:
    q, kv, idx, sink, scale = _inputs(*CASES[case])
    assert_close(sparse_attention_ref(q, kv, idx, sink, scale), _naive(q, kv, idx, sink, scale), atol=1e-4)


def test_reference_matches_model_softmax_with_sink() -> None:
    """The reference's softmax is the model's `Attention._softmax_with_sink` (duck-typed self)."""
    q, kv, idx, sink, scale = _inputs(*CASES["decode"])
    keys = kv.float()[idx.clamp(min=0).long()]
    logits = torch.einsum("thd,tld->thl", q.float(), keys) * scale
    probs = Attention._softmax_with_sink(SimpleNamespace(attn_sink=sink), logits, idx >= 0)
    want = torch.einsum("thl,tld->thd", probs, keys)
    assert_close(sparse_attention_ref(q, kv, idx, sink, scale), want, atol=1e-6)


@requires_triton
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(case: str) -> None:
    q, kv, idx, sink, scale = _inputs(*CASES[case], seed=1)
    out = sparse_attention_triton(q, kv, idx, sink, scale, out=poisoned(tuple(q.shape), q.dtype), block_l=16)
    ref = sparse_attention_ref(q, kv, idx, sink, scale)
    assert_close(out, ref)
    if q.shape[0] > 2:
        assert out[0].abs().max() == 0  # nothing valid -> zeros, not NaN


@requires_triton
def test_kernel_strided_query_and_empty_batch() -> None:
    q, kv, idx, sink, scale = _inputs(3, 8, 32, 12, 20, torch.float32, seed=2)
    wide = torch.randn(3, 8, 64)
    wide[..., :32] = q  # q as a non-contiguous view, as the model slices heads
    out = sparse_attention_triton(wide[..., :32], kv, idx, sink, scale, out=poisoned((3, 8, 32), torch.float32))
    assert_close(out, sparse_attention_ref(q, kv, idx, sink, scale))
    empty = sparse_attention_triton(q[:0], kv, idx[:0], sink, scale)
    assert empty.shape == (0, 8, 32)


def test_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    q, kv, idx, sink, scale = _inputs(*CASES["single-token"])
    monkeypatch.setenv("DSV4_KERNELS", "ref")
    assert not kernels.use_triton(q)
    assert_close(kernels.sparse_attention(q, kv, idx, sink, scale), sparse_attention_ref(q, kv, idx, sink, scale))
    monkeypatch.setenv("DSV4_KERNELS", "auto")
    assert not kernels.use_triton(q)  # CPU tensors: the reference
    monkeypatch.setenv("DSV4_KERNELS", "fast")
    with pytest.raises(ValueError, match="known: auto, ref, triton"):
        kernels.use_triton(q)
    if kernels.HAS_TRITON:
        monkeypatch.setenv("DSV4_KERNELS", "triton")
        assert kernels.use_triton(q)
        out = kernels.sparse_attention(q, kv, idx, sink, scale, out=poisoned(tuple(q.shape), q.dtype))
        assert_close(out, sparse_attention_ref(q, kv, idx, sink, scale))


def test_shape_errors() -> None:
    q, kv, idx, sink, scale = _inputs(*CASES["single-token"])
    with pytest.raises(ValueError, match="do not fit"):
        sparse_attention_ref(q, kv[:, :-1], idx, sink, scale)
    with pytest.raises(ValueError, match="out must be"):
        sparse_attention_ref(q, kv, idx, sink, scale, out=torch.empty(1, 4, 32, dtype=torch.bfloat16))
