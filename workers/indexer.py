"""The lightning indexer of DeepSeek-V4's CSA layers (docs/model.md §4.4): scores the
ratio-4 compressed entries per query and keeps the top-k visible ones.

Legend: T tokens of the flat batch, R query rows, N compressed entries, nI/cI indexer heads/dims.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kernels.quant import fp4_qdq, hadamard
from kernels.rmsnorm_rope import apply_rope
from workers.compressor import Compressor
from workers.config import ModelConfig
from workers.layers import Linear


def top_k_stable(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Columns of the k largest scores per row [R, W] -> [R, k], largest first, ties to the
    earlier column: what a stable descending sort's first k columns are, without sorting W.

    torch.topk picks a set but breaks ties across the cut in no particular order, so it
    gives only each row's k-th value: the row keeps every score above it, then the earliest
    of those equal to it (rows with fewer than k visible entries, all -inf past them, keep
    the earliest -inf ones). Every row takes this exact path, with static shapes: no host
    sync, nothing depends on the data but values. The k columns, found in column order,
    are then ordered by score, ties by column."""
    if k == 0 or scores.shape[1] <= k:
        return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    kth = torch.topk(scores, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above, equal = scores > kth, scores == kth
    need = k - above.sum(dim=1, keepdim=True)
    take = above | (equal & (equal.cumsum(dim=1) <= need))  # exactly k per row
    slot = torch.where(take, take.cumsum(dim=1) - 1, k)  # where each taken column goes; k: nowhere
    cols = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    cols = torch.empty(scores.shape[0], k + 1, dtype=torch.int64, device=scores.device).scatter_(1, slot, cols)[:, :k]
    order = torch.sort(scores.gather(1, cols), dim=-1, descending=True, stable=True).indices
    return cols.gather(1, order)


class Indexer(nn.Module):
    """Lightning indexer (docs/model.md §4.4): picks the top-k visible ratio-4 entries per query."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, dtype)
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads, dtype)
        self.compressor = Compressor(cfg, 4, self.head_dim, rotate=True)
        self.weight_scale = self.head_dim**-0.5 * self.n_heads**-0.5

    def queries(
        self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, simulate_quant: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat batch: (q [T, nI, cI], head weights [T, nI] fp32)."""
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        q = apply_rope(q, cos, sin)
        if simulate_quant:
            q = fp4_qdq(hadamard(q), 32)
        w = self.weights_proj(x).float() * self.weight_scale
        return q, w

    def select(
        self, q: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, read: Callable[[int, int], torch.Tensor],
        tile: int | None = None, n: int | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """q [R, nI, cI], w [R, nI]; row r sees its first counts[r] keys; `read(a, b)` gives keys
        a..b-1, shared by every row [b-a, cI] (one sequence's prefill chunk) or per row
        [R, b-a, cI] (a decode batch) -> picked entries [R, k] (-1 = none).

        score[r, j] = sum_h w[r, h] * relu(q[r, h] . keys[j]). Keys are read and scored
        `tile` at a time (default 16384) with a running top-k, and rows in blocks, so memory
        is bounded (~64 MiB of scores), never [R, N/4] (a 1M-token sequence has 262144
        keys). Ties keep the earlier entry (the running best come first in each stable
        selection), so any chunking or tiling picks the same set. `n` is max(counts) when the
        caller knows it (a decode step knows it on the host: then nothing here syncs)."""
        rows, dev = q.shape[0], q.device
        if n is None:
            n = int(counts.max()) if counts.numel() else 0
        k = min(self.topk, n)
        best_s = torch.empty(rows, 0, device=dev)
        best_i = torch.empty(rows, 0, dtype=torch.int64, device=dev)
        qf = q.float()
        tile = tile or 1 << 14  # a power of two: whole pages; longer tiles measured slower (topk on long rows)
        for t0 in range(0, n, tile):
            ids = torch.arange(t0, min(n, t0 + tile), device=dev)
            keys = read(t0, t0 + ids.shape[0]).float()
            block = max(1, (1 << 24) // (self.n_heads * ids.shape[0]))
            parts = []
            for b0 in range(0, rows, block):
                b = slice(b0, b0 + block)
                kb = keys if keys.dim() == 2 else keys[b]
                s = torch.einsum("bhc,nc->bhn" if kb.dim() == 2 else "bhc,bnc->bhn", qf[b], kb).relu_()
                s = torch.einsum("bhn,bh->bn", s, w[b])
                s.masked_fill_(ids[None, :] >= counts[b, None], float("-inf"))  # keys a row does not see yet
                top = top_k_stable(s, min(k, s.shape[1]))  # the tile's best, then merged with the running best
                s, i = torch.cat((best_s[b], s.gather(1, top)), dim=1), torch.cat((best_i[b], ids[top]), dim=1)
                order = top_k_stable(s, k)
                parts.append((s.gather(1, order), i.gather(1, order)))
            best_s, best_i = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return torch.where(best_s > float("-inf"), best_i, -1)
