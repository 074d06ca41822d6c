"""kernels: Triton kernels for the hot paths, each beside a pure-torch reference, and the
number formats they read (docs/architecture.md §10). The bottom floor: imports nothing else
of the project.

`kernels/<name>.py` holds the kernel, its launcher `<name>_triton` and `<name>_ref` (same
signature; the CPU path) built from the pure-torch math beside it (`rmsnorm_rope.rms_scale`,
`rmsnorm_rope.apply_rope`, which the model also calls unfused, `sinkhorn.sinkhorn`). `kernels/quant.py`
holds the checkpoints' number formats and the QAT simulation. The functions below dispatch:
Triton when every tensor is on CUDA and Triton imports, else the reference.
`DSV4_KERNELS=ref|triton` forces one side; `triton` with CPU tensors runs Triton's
interpreter (for tests). Importing this package never needs Triton.

These dispatchers shadow the submodules of the same name as package attributes: import
a module's own functions as `from kernels.sparse_attention import sparse_attention_ref`.
"""

from __future__ import annotations

import os

import torch

from kernels._triton import HAS_TRITON
from kernels.compressor_pool import compressor_pool_ref, compressor_pool_triton
from kernels.fp4_grouped_gemm import fp4_grouped_gemm_ref, fp4_grouped_gemm_triton
from kernels.fp8_gemm import fp8_gemm_ref, fp8_gemm_triton
from kernels.indexer_topk import (
    indexer_topk_paged_ref,
    indexer_topk_paged_triton,
    indexer_topk_ref,
    indexer_topk_triton,
)
from kernels.rmsnorm_rope import rmsnorm_rope_ref, rmsnorm_rope_triton
from kernels.sinkhorn import sinkhorn_ref, sinkhorn_triton
from kernels.sparse_attention import sparse_attention_ref, sparse_attention_triton

__all__ = [
    "HAS_TRITON", "compressor_pool", "fp4_grouped_gemm", "fp8_gemm", "indexer_topk", "indexer_topk_paged",
    "rmsnorm_rope", "sinkhorn",
    "sparse_attention", "use_triton",
]  # fmt: skip

_MODES = ("auto", "ref", "triton")


def use_triton(*tensors: torch.Tensor) -> bool:
    """The dispatch rule: `DSV4_KERNELS` (auto|ref|triton, default auto), else CUDA + Triton."""
    mode = os.environ.get("DSV4_KERNELS", "auto") or "auto"
    if mode not in _MODES:
        raise ValueError(f"DSV4_KERNELS={mode!r}; known: {', '.join(_MODES)}")
    if mode == "ref":
        return False
    if mode == "triton":
        if not HAS_TRITON:
            raise RuntimeError("DSV4_KERNELS=triton but triton does not import")
        return True
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """q [T, H, D], kv [N, D], idx [T, L] (-1 = none), sink [H] -> o [T, H, D]; see kernels.sparse_attention."""
    fn = sparse_attention_triton if use_triton(q, kv, idx) else sparse_attention_ref
    return fn(q, kv, idx, sink, scale, out=out)


def indexer_topk(
    q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, visible_len: torch.Tensor, k: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """q [T, nI, cI], w [T, nI], keys [N, cI], visible_len [T] -> ids [T, k] int32; see kernels.indexer_topk."""
    fn = indexer_topk_triton if use_triton(q, keys) else indexer_topk_ref
    return fn(q, w, keys, visible_len, k, out=out)


def indexer_topk_paged(
    q: torch.Tensor, w: torch.Tensor, pool: torch.Tensor, page_table: torch.Tensor, epp: int, counts: torch.Tensor,
    k: int, out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """q [B, nI, cI], w [B, nI], pool [R, cI], page_table [B, P], counts [B] -> entry ids [B, k] int32: row b
    scores its own keys pool[page_table[b, j // epp] * epp + j % epp], j < counts[b]; see kernels.indexer_topk."""
    fn = indexer_topk_paged_triton if use_triton(q, pool) else indexer_topk_paged_ref
    return fn(q, w, pool, page_table, epp, counts, k, out=out)


def fp4_grouped_gemm(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """x [P, K], e2m1 packed [E, N, K/2], e8m0 scale [E, N, K/32], offsets [E+1] -> [P, N]; see fp4_grouped_gemm.py."""
    fn = fp4_grouped_gemm_triton if use_triton(x, packed) else fp4_grouped_gemm_ref
    return fn(x, packed, scale, offsets, out=out)


def fp8_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K], e4m3 w [N, K], w_scale [ceil(N/128), ceil(K/128)] -> [M, N]; see kernels.fp8_gemm."""
    fn = fp8_gemm_triton if use_triton(x, w) else fp8_gemm_ref
    return fn(x, w, w_scale, out=out)


def sinkhorn(logits: torch.Tensor, iters: int, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """logits [T, n, n] -> fp32 [T, n, n]; see kernels.sinkhorn."""
    fn = sinkhorn_triton if use_triton(logits) else sinkhorn_ref
    return fn(logits, iters, eps, out=out)


def rmsnorm_rope(
    x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """x [T, (H,) D], weight [D] or None, cos/sin [T, rd/2] -> like x; see kernels.rmsnorm_rope."""
    fn = rmsnorm_rope_triton if use_triton(x, cos) else rmsnorm_rope_ref
    return fn(x, weight, cos, sin, eps, out=out)


def compressor_pool(
    kv: torch.Tensor, score: torch.Tensor, prev_kv: torch.Tensor | None = None, prev_score: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """kv, score [n, r, coff*c] (+ prev_kv, prev_score with overlap) fp32 -> [n, c]; see kernels.compressor_pool."""
    fn = compressor_pool_triton if use_triton(kv, score) else compressor_pool_ref
    return fn(kv, score, prev_kv, prev_score, out=out)
