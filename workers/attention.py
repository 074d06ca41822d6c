"""DeepSeek-V4 hybrid attention (docs/model.md §4): sliding window + CSA (ratio 4, lightning
indexer, top-k) + HCA (ratio 128, all entries), one softmax with a sink per head.

Legend: T tokens of the flat batch, S tokens of one sequence's chunk, H heads,
D head_dim, rd rope dims, N compressed entries, c compressor width, nI/cI indexer
heads/dims. Positions are absolute raw-token positions of each sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import kernels
from kernels.quant import fp8_qdq
from kernels.rmsnorm_rope import apply_rope
from workers.compressor import Compressor
from workers.config import ModelConfig
from workers.indexer import Indexer
from workers.kv_pool import LayerPool, StepView
from workers.layers import Linear, RMSNorm


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


def _block_rows(gathered_per_row: int) -> int:
    """Query rows per attention block: 128, fewer when each row gathers many entries (~16 MiB a block)."""
    return max(1, min(128, (1 << 22) // max(1, gathered_per_row)))


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
            picked = self.indexer.select(*c.idx_q, counts, read_keys, n=n_keys)
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
                                                 lambda t0, t1: pool.indexer.read_span(view.page_table, t0, t1),
                                                 n=most)  # fmt: skip
                rows.append(pool.entry_rows(view.page_table, picked.clamp(min=0)))
                masks.append(picked >= 0)
        rows, mask = torch.cat(rows, dim=1), torch.cat(masks, dim=1)
        if self._fused(q):  # the kernel gathers the rows itself
            idx = torch.where(mask, rows, -1)
            return kernels.sparse_attention(q, pool.kv_rows, idx, self.attn_sink, self.head_dim**-0.5)
        # index_select: 6x faster than kv_rows[rows] on CPU; where: 1.5x masked_fill_
        keys = pool.kv_rows.index_select(0, rows.flatten()).view(*rows.shape, self.head_dim).float()
        keys = torch.where(mask[..., None], keys, 0.0)  # padding may hold stale rows, even NaN
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
