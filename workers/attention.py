"""DeepSeek-V4 hybrid attention (SPEC §4): sliding window + CSA (ratio 4, lightning
indexer, top-k) + HCA (ratio 128, all entries), one softmax with a sink per head.

Legend: T tokens of the flat batch, S tokens of one sequence's chunk, H heads,
D head_dim, rd rope dims, N compressed entries, c compressor width, nI/cI indexer
heads/dims. Positions are absolute raw-token positions of each sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import kernels
from workers.config import ModelConfig
from workers.kv_pool import CompressorPool, LayerPool, StepView
from workers.layers import Linear, RMSNorm, apply_rope
from workers.quant import fp4_qdq, fp8_qdq, hadamard


@dataclass(frozen=True)
class SeqSlice:
    """Where one sequence's chunk sits in the flat batch."""

    start: int  # first row in the flat batch
    end: int  # one past the last row
    pos0: int  # absolute position of the first token
    chunk: tuple[int, int] | None = None  # context parallel: the whole chunk's positions [a, b) over the ranks


@dataclass(frozen=True)
class ChunkRows:
    """One sequence's rows of a layer's projections: q [S, H, D], kv [S, D], positions [S];
    the compressor's (kv, score) [S, coff*c] and the indexer's (q, w) and compressor rows
    where the layer has them."""

    q: torch.Tensor
    kv: torch.Tensor
    positions: torch.Tensor
    comp: tuple[torch.Tensor, torch.Tensor] | None
    idx_q: tuple[torch.Tensor, torch.Tensor] | None
    idx_comp: tuple[torch.Tensor, torch.Tensor] | None

    @classmethod
    def of(cls, sq: SeqSlice, q, kv, positions, comp, idx_q, idx_comp) -> ChunkRows:
        r = slice(sq.start, sq.end)
        pick = lambda pair: None if pair is None else (pair[0][r], pair[1][r])  # noqa: E731
        return cls(q[r], kv[r], positions[r], pick(comp), pick(idx_q), pick(idx_comp))


def top_k_stable(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Columns of the k largest scores per row [R, W] -> [R, k], largest first, ties to the
    earlier column: what a stable descending sort's first k columns are, without sorting W.

    torch.topk picks a set; it is the right one unless the row's (k+1)-th score equals its
    k-th (then topk broke a tie in no particular order). Those rows
    (rare with real scores; rows with fewer than k visible entries, all -inf past them)
    take the exact path: every score above the k-th value, then the earliest of those
    equal to it. The k picked columns are then ordered by score, ties by column."""
    if k == 0 or scores.shape[1] <= k:
        return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    vals, cols = torch.topk(scores, k + 1, dim=1)  # one more: a tie across the cut shows as vals[k] == vals[k-1]
    kth, cols = vals[:, k - 1 : k], cols[:, :k]
    tied = (vals[:, k] == vals[:, k - 1]).nonzero().squeeze(1)
    if tied.numel():
        sub = scores[tied]
        above, equal = sub > kth[tied], sub == kth[tied]
        need = k - above.sum(dim=1, keepdim=True)
        take = above | (equal & (equal.cumsum(dim=1) <= need))
        cols[tied] = take.nonzero()[:, 1].view(-1, k)  # row-major: each row's k columns, in column order
    cols = cols.sort(dim=1).values  # by column, so the stable sort below breaks ties by column
    order = torch.sort(scores.gather(1, cols), dim=-1, descending=True, stable=True).indices
    return cols.gather(1, order)


def _block_rows(gathered_per_row: int) -> int:
    """Query rows per attention block: 128, fewer when each row gathers many entries (~16 MiB a block)."""
    return max(1, min(128, (1 << 22) // max(1, gathered_per_row)))


class Compressor(nn.Module):
    """Gated pooling of `ratio` consecutive tokens into one entry (SPEC §4.3).

    ratio 4 overlaps: entry j pools the first half of block j-1 and the second half of
    block j (2*ratio slots); ratio 128 pools its own block. `rotate` marks the indexer's
    compressor (Hadamard + FP4 simulation instead of FP8 on the non-RoPE dims).
    """

    def __init__(self, cfg: ModelConfig, ratio: int, width: int, rotate: bool) -> None:
        super().__init__()
        self.ratio, self.width, self.rotate = ratio, width, rotate
        self.overlap = ratio == 4
        coff = 2 if self.overlap else 1
        self.rd = cfg.qk_rope_head_dim
        self.wkv = Linear(cfg.hidden_size, coff * width, torch.float32)
        self.wgate = Linear(cfg.hidden_size, coff * width, torch.float32)
        self.ape = nn.Parameter(torch.empty(ratio, coff * width, dtype=torch.float32), requires_grad=False)
        self.norm = RMSNorm(width, cfg.rms_norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d] -> (kv, score) [T, coff*c] fp32, for the whole flat batch at once."""
        xf = x.float()
        return self.wkv(xf), self.wgate(xf)

    def update(
        self, pool: CompressorPool, slot: int, page_table: torch.Tensor, kv: torch.Tensor, score: torch.Tensor,
        pos0: int, inv_freq: torch.Tensor, simulate_quant: bool,
    ) -> int:  # fmt: skip
        """Feed one sequence's chunk projections [S, coff*c] at positions pos0...: write the
        entries of every block the chunk completes, keep the chunk's tail in the ring.
        Returns the sequence's number of entries after the chunk."""
        r, ring = self.ratio, pool.ring
        end = pos0 + kv.shape[0]
        dev = kv.device
        score = score + self.ape[torch.arange(pos0, end, device=dev) % r]
        k0, k1 = pos0 // r, end // r  # blocks k0 .. k1-1 complete in this chunk
        if k1 > k0:
            first = (k0 - 1) * r if self.overlap else k0 * r  # first position those blocks read
            held = torch.arange(max(first, 0), pos0, device=dev) % ring
            rows_kv = torch.cat((pool.ring_kv[slot, held], kv))[: k1 * r - max(first, 0)]
            rows_score = torch.cat((pool.ring_score[slot, held], score))[: k1 * r - max(first, 0)]
            if first < 0:  # block 0 has no previous block: it pools (0, -inf)
                rows_kv = torch.cat((torch.zeros_like(rows_kv[:r]), rows_kv))
                rows_score = torch.cat((torch.full_like(rows_score[:r], float("-inf")), rows_score))
            rows_kv, rows_score = rows_kv.unflatten(0, (-1, r)), rows_score.unflatten(0, (-1, r))
            ids = torch.arange(k0, k1, device=dev)
            if self.overlap:
                entries = self._emit(rows_kv[1:], rows_score[1:], rows_kv[:-1], rows_score[:-1], ids * r,
                                     inv_freq, simulate_quant, pool.dtype)  # fmt: skip
            else:
                entries = self._emit(rows_kv, rows_score, None, None, ids * r, inv_freq, simulate_quant, pool.dtype)
            pool.write(page_table, ids, entries)
        keep = torch.arange(max(pos0, end - ring), end, device=dev)
        pool.ring_kv[slot, keep % ring] = kv[keep - pos0]
        pool.ring_score[slot, keep % ring] = score[keep - pos0]
        return k1

    def update_rows(
        self, pool: CompressorPool, view: StepView, kv: torch.Tensor, score: torch.Tensor, positions: torch.Tensor,
        inv_freq: torch.Tensor, simulate_quant: bool,
    ) -> None:  # fmt: skip
        """Decode: one new row per sequence (kv/score [B, coff*c] at `positions` [B]); the
        blocks completed this step are pooled together in one batch."""
        r, ring = self.ratio, pool.ring
        score = score + self.ape[positions % r]
        pool.ring_kv[view.slots, positions % ring] = kv
        pool.ring_score[view.slots, positions % ring] = score
        closing = ((positions + 1) % r == 0).nonzero().squeeze(1)
        if closing.numel() == 0:
            return
        last = positions[closing]
        held = last[:, None] + 1 - ring + torch.arange(ring, device=kv.device)  # the positions each closing block reads
        slots = view.slots[closing, None]
        rows_kv, rows_score = pool.ring_kv[slots, held % ring], pool.ring_score[slots, held % ring]
        prev_kv = prev_score = None
        if self.overlap:  # [previous block | this block]; block 0's previous block is (0, -inf)
            before = (held < 0)[..., None]
            rows_kv = rows_kv.masked_fill(before, 0.0)
            rows_score = rows_score.masked_fill(before, float("-inf"))
            prev_kv, prev_score = rows_kv[:, :r], rows_score[:, :r]
            rows_kv, rows_score = rows_kv[:, r:], rows_score[:, r:]
        entries = self._emit(rows_kv, rows_score, prev_kv, prev_score, last + 1 - r, inv_freq, simulate_quant,
                             pool.dtype)  # fmt: skip
        pool.write(view.page_table[closing], ((last + 1) // r - 1)[:, None], entries)

    def _emit(
        self, kv: torch.Tensor, score: torch.Tensor, prev_kv: torch.Tensor | None, prev_score: torch.Tensor | None,
        starts: torch.Tensor, inv_freq: torch.Tensor, simulate_quant: bool, dtype: torch.dtype,
    ) -> torch.Tensor:  # fmt: skip
        """Complete blocks [n, r, coff*c] (+ their previous blocks when overlapping) -> entries [n, c].

        With overlap, the 2r slots are the previous block's first half then this block's
        second half; softmax over slots per channel; RMSNorm; RoPE at the block start;
        then the FP8 (main) or Hadamard + FP4 (indexer) simulation."""
        pooled = kernels.compressor_pool(kv, score, prev_kv, prev_score)  # [n, c]
        entries = self.norm(pooled.to(dtype))
        angles = starts.float()[:, None] * inv_freq[None, :]
        entries = apply_rope(entries, angles.cos(), angles.sin())
        return self._simulate_quant(entries) if simulate_quant else entries

    def _simulate_quant(self, entries: torch.Tensor) -> torch.Tensor:
        if self.rotate:
            return fp4_qdq(hadamard(entries), 32)
        nope = fp8_qdq(entries[..., : -self.rd], 64)
        return torch.cat((nope, entries[..., -self.rd :]), dim=-1)


class Indexer(nn.Module):
    """Lightning indexer (SPEC §4.4): picks the top-k visible ratio-4 entries per query."""

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
        tile: int | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """q [R, nI, cI], w [R, nI]; row r sees its first counts[r] keys; `read(a, b)` gives keys
        a..b-1, shared by every row [b-a, cI] (one sequence's prefill chunk) or per row
        [R, b-a, cI] (a decode batch) -> picked entries [R, k] (-1 = none).

        score[r, j] = sum_h w[r, h] * relu(q[r, h] . keys[j]). Keys are read and scored
        `tile` at a time (default 16384) with a running top-k, and rows in blocks, so memory
        is bounded (~64 MiB of scores), never [R, N/4] (a 1M-token sequence has 262144
        keys). Ties keep the earlier entry (the running best come first in each stable
        selection), so any chunking or tiling picks the same set."""
        rows, dev = q.shape[0], q.device
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
                if ids[-1] >= counts[b].min():  # some row does not see the whole tile
                    s.masked_fill_(ids[None, :] >= counts[b, None], float("-inf"))
                top = top_k_stable(s, min(k, s.shape[1]))  # the tile's best, then merged with the running best
                s, i = torch.cat((best_s[b], s.gather(1, top)), dim=1), torch.cat((best_i[b], ids[top]), dim=1)
                order = top_k_stable(s, k)
                parts.append((s.gather(1, order), i.gather(1, order)))
            best_s, best_i = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return torch.where(best_s > float("-inf"), best_i, -1)


class Attention(nn.Module):
    """One layer's attention; `compress_ratio` 0 (window only), 4 (CSA) or 128 (HCA)."""

    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        self.ratio = cfg.compress_ratio(layer_id)
        self.n_heads, self.head_dim, self.rd = cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim
        self.window = cfg.sliding_window
        self.eps = cfg.rms_norm_eps
        d, h, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.wq_a = Linear(d, cfg.q_lora_rank, dtype)
        self.q_norm = RMSNorm(cfg.q_lora_rank, self.eps)
        self.wq_b = Linear(cfg.q_lora_rank, h * hd, dtype)
        self.wkv = Linear(d, hd, dtype)
        self.kv_norm = RMSNorm(hd, self.eps)
        self.wo_a = Linear(h * hd // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, dtype)
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, d, dtype)
        self.attn_sink = nn.Parameter(torch.empty(h, dtype=torch.float32), requires_grad=False)
        self.compressor = Compressor(cfg, self.ratio, hd, rotate=False) if self.ratio else None
        self.indexer = Indexer(cfg, dtype) if self.ratio == 4 else None
        self.kernel_path: bool | None = None  # attend through kernels/ (None: where kernels.use_triton says)
        self.cp = None  # a workers.cp.ContextParallel, set from outside (apply_context_parallel)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        seqs: list[SeqSlice], pool: LayerPool, view: StepView, simulate_quant: bool,
    ) -> torch.Tensor:  # fmt: skip
        """x [T, d] (attn_norm output) -> [T, d]. `rope` is (inv_freq, cos [T, rd/2], sin);
        `pool` is this layer's KV tensors, `view` the batch's slots and page tables."""
        inv_freq, cos, sin = rope
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        q = kernels.rmsnorm_rope(q, None, cos, sin, self.eps)
        kv = kernels.rmsnorm_rope(self.wkv(x), self.kv_norm.weight, cos, sin, self.eps)
        if simulate_quant:
            kv = torch.cat((fp8_qdq(kv[:, : -self.rd], 64), kv[:, -self.rd :]), dim=-1)
        comp = self.compressor.project(x) if self.compressor is not None else None
        idx_q = idx_comp = None
        if self.indexer is not None:
            idx_q = self.indexer.queries(x, qr, cos, sin, simulate_quant)
            idx_comp = self.indexer.compressor.project(x)
        if seqs and all(sq.end - sq.start == 1 and sq.chunk is None for sq in seqs):
            last = max(sq.pos0 for sq in seqs)  # known here: no device sync for the entry counts
            out = self._decode(q, kv, positions, last, comp, idx_q, idx_comp, pool, view, inv_freq, simulate_quant)
            return self._project_out(apply_rope(out, cos, sin, inverse=True))
        out, fused = torch.empty_like(q), self._fused(q)
        for i, sq in enumerate(seqs):
            part = ChunkRows.of(sq, q, kv, positions, comp, idx_q, idx_comp)
            at = (int(view.slots[i]), view.page_table[i], pool)
            if sq.chunk is None:
                out[sq.start : sq.end] = self._prefill(part, sq.pos0, at, inv_freq, simulate_quant, fused)
            else:  # one rank's part of a context-parallel chunk (workers/cp.py)
                out[sq.start : sq.end] = self.cp.prefill(self, part, sq, at, inv_freq, simulate_quant, fused)
        out = apply_rope(out, cos, sin, inverse=True)
        return self._project_out(out)

    def _prefill(
        self, c: ChunkRows, pos0: int, at: tuple[int, torch.Tensor, LayerPool], inv_freq: torch.Tensor,
        simulate_quant: bool, fused: bool,
    ) -> torch.Tensor:  # fmt: skip
        """One sequence's chunk at positions pos0...: update its state, attend -> [S, H, D]."""
        before = self.window_before(at, pos0)
        entries = None
        if c.comp is not None:
            n, n_keys = self.compress(c, pos0, at, inv_freq, simulate_quant)
            entries = self.chunk_entries(c, at, n, n_keys, fused)
        out = (self._attend_fused if fused else self._attend)(c.q, c.kv, c.positions, before, entries)
        self.keep_window(at, pos0, c.kv)
        return out

    def window_before(self, at: tuple[int, torch.Tensor, LayerPool], pos0: int) -> torch.Tensor:
        """The window rows a chunk starting at pos0 sees before itself [lw, D] (lw <= window - 1)."""
        slot, _, pool = at
        ids = torch.arange(max(0, pos0 - self.window + 1), pos0, device=pool.kv_rows.device)
        return pool.window[slot, ids % pool.ring]

    def keep_window(self, at: tuple[int, torch.Tensor, LayerPool], pos0: int, kv: torch.Tensor) -> None:
        """Write rows kv [S, D] at positions pos0... into the slot's window ring (the last `ring` of them)."""
        slot, _, pool = at
        keep = torch.arange(max(pos0, pos0 + kv.shape[0] - pool.ring), pos0 + kv.shape[0], device=kv.device)
        pool.window[slot, keep % pool.ring] = kv[keep - pos0]

    def compress(
        self, c: ChunkRows, pos0: int, at: tuple[int, torch.Tensor, LayerPool], inv_freq: torch.Tensor,
        simulate_quant: bool,
    ) -> tuple[int, int]:  # fmt: skip
        """Feed the chunk to the compressors -> (entries, indexer keys) the sequence has after it."""
        slot, table, pool = at
        n = self.compressor.update(pool.compressor, slot, table, *c.comp, pos0, inv_freq, simulate_quant)
        if self.indexer is None:
            return n, 0
        return n, self.indexer.compressor.update(pool.indexer, slot, table, *c.idx_comp, pos0, inv_freq,
                                                 simulate_quant)  # fmt: skip

    def chunk_entries(
        self, c: ChunkRows, at: tuple[int, torch.Tensor, LayerPool], n: int, n_keys: int, fused: bool
    ) -> tuple[torch.Tensor, object]:
        """The compressed entries a prefill chunk attends to, with which query sees which.

        HCA: (all n entries [n, D], visibility mask [S, n]). CSA: (the indexer's picks
        [S, k] (-1 = none), a reader of entries by id) -- entries are gathered through the
        page table per query block, never all N/4 of them at once."""
        _, table, pool = at
        positions = c.positions
        if self.indexer is None:  # HCA: every complete block so far (N/128 entries: few)
            ids = torch.arange(n, device=positions.device)
            return pool.compressor.read(table, ids), ids[None, :] < ((positions + 1) // self.ratio)[:, None]
        counts, k = torch.clamp((positions + 1) // 4, max=n_keys), min(self.indexer.topk, n_keys)
        read_keys = lambda a, b: pool.indexer.read_span(table, a, b)  # noqa: E731
        if fused and k:  # one sequence's keys, scored and selected by the fused kernel
            picked = kernels.indexer_topk(*c.idx_q, read_keys(0, n_keys), counts, k).long()
        else:
            picked = self.indexer.select(*c.idx_q, counts, read_keys)
        return picked, lambda ids: pool.compressor.read(table.expand(ids.shape[0], -1), ids)

    def _attend(
        self, q: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, before: torch.Tensor,
        entries: tuple[torch.Tensor, object] | None,
    ) -> torch.Tensor:  # fmt: skip
        """One chunk: q [S, H, D], kv [S, D], the window rows before it [lw, D] -> [S, H, D];
        one softmax per head with the sink.

        Queries run in blocks, each against only the window rows it can see (so the cost
        is linear in S) plus its compressed entries (`_chunk_entries`): all visible ones
        on HCA layers, the indexer's picks gathered per query block on CSA layers.
        """
        lw, width = before.shape[0], self.window
        keys = torch.cat((before, kv)).float()  # row j holds position pos0 - lw + j
        dense = gathered = None
        if entries is not None and self.indexer is None and entries[0].shape[0] > 0:
            dense = (entries[0].float(), entries[1])
        elif entries is not None and self.indexer is not None and entries[0].shape[1] > 0:
            gathered = entries
        rows = _block_rows(gathered[0].shape[1] * self.head_dim if gathered else 0)
        pos0, qf = int(positions[0]), q.float() * self.head_dim**-0.5
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        for b0 in range(0, q.shape[0], rows):
            b1 = min(b0 + rows, q.shape[0])
            k0 = max(0, lw + b0 - (width - 1))
            kw = keys[k0 : lw + b1]
            delta = positions[b0:b1, None] - (pos0 - lw + torch.arange(k0, lw + b1, device=q.device))[None, :]
            mask = (delta >= 0) & (delta < width)
            if dense is not None:  # HCA: dense over the (few) 128x entries
                kw, mask = torch.cat((kw, dense[0])), torch.cat((mask, dense[1][b0:b1]), dim=1)
            logits = torch.einsum("shd,ld->shl", qf[b0:b1], kw)
            if gathered is None:
                out[b0:b1] = torch.einsum("shl,ld->shd", self._softmax_with_sink(logits, mask), kw)
                continue
            picked = gathered[0][b0:b1]
            picked_keys = gathered[1](picked.clamp(min=0)).float()  # [Sb, k, D]
            logits = torch.cat((logits, torch.einsum("shd,skd->shk", qf[b0:b1], picked_keys)), dim=-1)
            probs = self._softmax_with_sink(logits, torch.cat((mask, picked >= 0), dim=1))
            out[b0:b1] = torch.einsum("shl,ld->shd", probs[..., : kw.shape[0]], kw) + torch.einsum(
                "shk,skd->shd", probs[..., kw.shape[0] :], picked_keys
            )
        return out.to(q.dtype)

    def _decode(
        self, q, kv, positions, last: int, comp, idx_q, idx_comp, pool: LayerPool, view: StepView, inv_freq,
        simulate_quant,
    ) -> torch.Tensor:  # fmt: skip
        """Decode step, one token per sequence, as one batch: q [B, H, D], kv [B, D] -> [B, H, D];
        `last` is the batch's largest position (max(positions), from the host).

        Each row attends to its window ring (the new row written first) and its compressed
        entries, gathered through the page tables: all of them on HCA layers, the indexer's
        top-k on CSA layers. Every existing entry is visible to a decode query (an entry
        exists once its block is complete); padding is masked.
        """
        ring, dev = pool.ring, q.device
        pool.window[view.slots, positions % ring] = kv
        age = (positions[:, None] - torch.arange(ring, device=dev)[None, :]) % ring
        rows = [pool.window_rows(view.slots)]  # [B, ring] rows of kv_rows; j holds the latest position = j mod ring
        masks = [(age < self.window) & (age <= positions[:, None])]
        if comp is not None:
            self.compressor.update_rows(pool.compressor, view, *comp, positions, inv_freq, simulate_quant)
            counts, most = (positions + 1) // self.ratio, (last + 1) // self.ratio
            if self.indexer is None:
                ids = torch.arange(most, device=dev).expand(len(positions), -1)
                rows.append(pool.entry_rows(view.page_table, ids))
                masks.append(ids < counts[:, None])
            else:
                self.indexer.compressor.update_rows(pool.indexer, view, *idx_comp, positions, inv_freq, simulate_quant)
                k = min(self.indexer.topk, most)
                if self._fused(q) and k:  # every row's keys, read through its page table by the fused kernel
                    picked = kernels.indexer_topk_paged(idx_q[0], idx_q[1], pool.indexer.entries, view.page_table,
                                                        pool.indexer.epp, counts, k).long()  # fmt: skip
                else:
                    picked = self.indexer.select(*idx_q, counts,
                                                 lambda t0, t1: pool.indexer.read_span(view.page_table, t0, t1))
                rows.append(pool.entry_rows(view.page_table, picked.clamp(min=0)))
                masks.append(picked >= 0)
        rows, mask = torch.cat(rows, dim=1), torch.cat(masks, dim=1)
        if self._fused(q):  # the kernel gathers the rows itself
            idx = torch.where(mask, rows, -1)
            return kernels.sparse_attention(q, pool.kv_rows, idx, self.attn_sink, self.head_dim**-0.5)
        keys = pool.kv_rows[rows].float().masked_fill_(~mask[..., None], 0.0)  # padding may hold stale rows
        logits = torch.einsum("bhd,bld->bhl", q.float(), keys) * self.head_dim**-0.5
        out = torch.einsum("bhl,bld->bhd", self._softmax_with_sink(logits, mask), keys)
        return out.to(q.dtype)

    def _attend_fused(
        self, q: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, before: torch.Tensor,
        entries: tuple[torch.Tensor, object] | None,
    ) -> torch.Tensor:  # fmt: skip
        """`_attend` through `kernels.sparse_attention`: the window rows [before | kv] and the
        chunk's compressed entries become rows of one tensor, and each query lists the rows
        it sees (query t: rows lw+t-window+1 .. lw+t of the window part; then its visible
        HCA entries or its indexer picks). Query blocks bound the gathered CSA entries."""
        lw, s, dev = before.shape[0], q.shape[0], q.device
        win = (lw + torch.arange(s, device=dev))[:, None] - torch.arange(self.window, device=dev)[None, :]
        win = win.masked_fill(win < 0, -1)
        base, hca = lw + s, entries is not None and self.indexer is None
        extra = 0 if entries is None else entries[0].shape[0] if hca else entries[0].shape[1]
        rows = _block_rows((self.window + extra) * (1 if hca else self.head_dim))
        out = torch.empty_like(q)
        for b0 in range(0, s, rows):
            b = slice(b0, b0 + rows)
            srcs, idx = [before, kv], [win[b]]
            if hca:  # every visible 128x entry
                srcs.append(entries[0])
                ids = base + torch.arange(entries[0].shape[0], device=dev)
                idx.append(torch.where(entries[1][b], ids, -1))
            elif entries is not None:  # this block's indexer picks, gathered from the pages
                picked = entries[0][b]
                srcs.append(entries[1](picked.clamp(min=0)).flatten(0, 1))
                ids = base + torch.arange(picked.numel(), device=dev).view(picked.shape)
                idx.append(torch.where(picked >= 0, ids, -1))
            kernels.sparse_attention(q[b], torch.cat(srcs).to(q.dtype), torch.cat(idx, dim=1), self.attn_sink,
                                     self.head_dim**-0.5, out=out[b])  # fmt: skip
        return out

    def _fused(self, q: torch.Tensor) -> bool:
        """Attend through kernels/ (sparse attention over gathered row ids, fused indexer
        top-k): on GPU, or when forced. Else the pure-torch path, which gathers keys itself."""
        return kernels.use_triton(q) if self.kernel_path is None else self.kernel_path

    def _softmax_with_sink(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """logits [X, H, L], mask [X, L] -> probabilities [X, H, L]; the sink adds only to the denominator."""
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        sink = self.attn_sink.view(1, -1, 1)
        peak = torch.maximum(logits.amax(dim=-1, keepdim=True), sink)
        probs = torch.exp(logits - peak)
        return probs / (probs.sum(dim=-1, keepdim=True) + torch.exp(sink - peak))

    def _project_out(self, o: torch.Tensor) -> torch.Tensor:
        """Grouped low-rank output projection: [T, H, D] -> [T, d]."""
        g = self.cfg.o_groups
        o = o.reshape(o.shape[0], g, self.n_heads * self.head_dim // g)
        wo_a = self.wo_a.weight.view(g, self.cfg.o_lora_rank, -1)
        z = torch.einsum("tgi,gri->tgr", o.to(wo_a.dtype), wo_a)
        return self.wo_b(z.flatten(1))
