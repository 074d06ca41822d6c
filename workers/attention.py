"""DeepSeek-V4 hybrid attention (SPEC §4): sliding window + CSA (ratio 4, lightning
indexer, top-k) + HCA (ratio 128, all entries), one softmax with a sink per head.

Legend: T tokens of the flat batch, S tokens of one sequence's chunk, H heads,
D head_dim, rd rope dims, N compressed entries, c compressor width, nI/cI indexer
heads/dims. Positions are absolute raw-token positions of each sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workers.config import ModelConfig
from workers.layers import Linear, RMSNorm, apply_rope, rms_scale
from workers.quant import fp4_qdq, fp8_qdq, hadamard
from workers.state import CompressorState, LayerState


@dataclass(frozen=True)
class SeqSlice:
    """Where one sequence's chunk sits in the flat batch."""

    start: int  # first row in the flat batch
    end: int  # one past the last row
    pos0: int  # absolute position of the first token


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

    def new_state(self, dtype: torch.dtype) -> CompressorState:
        return CompressorState(self.width, self.wkv.weight.shape[0], dtype)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d] -> (kv, score) [T, coff*c] fp32, for the whole flat batch at once."""
        xf = x.float()
        return self.wkv(xf), self.wgate(xf)

    def update(
        self, st: CompressorState, kv: torch.Tensor, score: torch.Tensor, pos0: int,
        inv_freq: torch.Tensor, simulate_quant: bool,
    ) -> None:  # fmt: skip
        """Feed one sequence's chunk projections [S, coff*c] at positions pos0...; append
        the entries of every block completed by this chunk to `st.entries`."""
        r = self.ratio
        score = score + self.ape[torch.arange(pos0, pos0 + kv.shape[0]) % r]
        kv = torch.cat((st.open_kv, kv))
        score = torch.cat((st.open_score, score))
        first_pos = pos0 - st.open_kv.shape[0]  # block aligned
        n = kv.shape[0] // r
        st.open_kv, st.open_score = kv[n * r :], score[n * r :]
        if n == 0:
            return
        kv, score = kv[: n * r].view(n, r, -1), score[: n * r].view(n, r, -1)
        prev_kv = prev_score = None
        if self.overlap:  # block k pools with block k-1; block 0 with the carried one
            carried_kv, carried_score = self._carried([st], kv)
            prev_kv, prev_score = torch.cat((carried_kv, kv[:-1])), torch.cat((carried_score, score[:-1]))
            st.prev_kv, st.prev_score = kv[-1], score[-1]
        starts = first_pos + r * torch.arange(n)
        st.entries.append(self._emit(kv, score, prev_kv, prev_score, starts, inv_freq, simulate_quant, st.dtype))

    def update_rows(
        self, states: list[CompressorState], kv: torch.Tensor, score: torch.Tensor, positions: torch.Tensor,
        inv_freq: torch.Tensor, simulate_quant: bool,
    ) -> None:  # fmt: skip
        """Decode: one new row per sequence (kv/score [B, coff*c] at `positions` [B]); the
        blocks completed this step are pooled together in one batch."""
        r = self.ratio
        score = score + self.ape[positions % r]
        closing = []
        for i, st in enumerate(states):
            st.open_kv = torch.cat((st.open_kv, kv[i : i + 1]))
            st.open_score = torch.cat((st.open_score, score[i : i + 1]))
            if st.open_kv.shape[0] == r:
                closing.append(i)
        if not closing:
            return
        done = [states[i] for i in closing]
        kv = torch.stack([st.open_kv for st in done])  # [m, r, coff*c]
        score = torch.stack([st.open_score for st in done])
        prev_kv = prev_score = None
        if self.overlap:
            prev_kv, prev_score = self._carried(done, kv)
        for j, st in enumerate(done):
            if self.overlap:
                st.prev_kv, st.prev_score = kv[j], score[j]
            st.open_kv, st.open_score = kv[j, :0], score[j, :0]
        starts = positions[closing] + 1 - r
        entries = self._emit(kv, score, prev_kv, prev_score, starts, inv_freq, simulate_quant, done[0].dtype)
        for j, st in enumerate(done):
            st.entries.append(entries[j : j + 1])

    def _carried(self, states: list[CompressorState], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each state's previous complete block [m, r, 2c]; (0, -inf) where there is none yet."""
        zeros, ninf = torch.zeros_like(like[0]), torch.full_like(like[0], float("-inf"))
        kv = torch.stack([zeros if st.prev_kv is None else st.prev_kv for st in states])
        score = torch.stack([ninf if st.prev_score is None else st.prev_score for st in states])
        return kv, score

    def _emit(
        self, kv: torch.Tensor, score: torch.Tensor, prev_kv: torch.Tensor | None, prev_score: torch.Tensor | None,
        starts: torch.Tensor, inv_freq: torch.Tensor, simulate_quant: bool, dtype: torch.dtype,
    ) -> torch.Tensor:  # fmt: skip
        """Complete blocks [n, r, coff*c] (+ their previous blocks when overlapping) -> entries [n, c].

        With overlap, the 2r slots are the previous block's first half then this block's
        second half; softmax over slots per channel; RMSNorm; RoPE at the block start;
        then the FP8 (main) or Hadamard + FP4 (indexer) simulation."""
        c = self.width
        if self.overlap:
            kv = torch.cat((prev_kv[..., :c], kv[..., c:]), dim=1)
            score = torch.cat((prev_score[..., :c], score[..., c:]), dim=1)
        pooled = (kv * score.softmax(dim=1)).sum(dim=1)  # [n, c]
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

    def select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One chunk: q [S, nI, cI], w [S, nI], keys [N, cI] -> picked entries [S, k] (-1 = none).

        score[t, j] = sum_h w[t, h] * relu(q[t, h] . keys[j]); invisible entries (j >=
        (t+1)//4) are never picked; ties go to the earlier entry (stable sort) so that any
        chunking picks the same set. Queries run in blocks so the [rows, nI, N] scores stay
        bounded (about 64 MiB).
        """
        n = keys.shape[0]
        k = min(self.topk, n)
        keys = keys.float()
        rows = max(1, min(q.shape[0], (1 << 24) // max(1, self.n_heads * n)))
        picked = []
        for b0 in range(0, q.shape[0], rows):
            qb, wb, pb = q[b0 : b0 + rows].float(), w[b0 : b0 + rows], positions[b0 : b0 + rows]
            visible = torch.arange(n)[None, :] < ((pb + 1) // 4)[:, None]
            scores = torch.einsum("shn,sh->sn", torch.einsum("shc,nc->shn", qb, keys).relu_(), wb)
            scores = scores.masked_fill(~visible, float("-inf"))
            order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
            picked.append(torch.where(visible.gather(1, order), order, -1))
        return torch.cat(picked)

    def select_rows(self, q: torch.Tensor, w: torch.Tensor, keys: list[torch.Tensor]) -> torch.Tensor:
        """Decode: q [B, nI, cI], w [B, nI], each row's keys [N_b, cI] -> mask [B, max N_b].

        Every existing key is visible to a decode query; padding never counts."""
        counts = torch.tensor([k.shape[0] for k in keys])
        padded = nn.utils.rnn.pad_sequence(keys, batch_first=True).float()  # [B, N, cI]
        if padded.shape[1] == 0:
            return torch.zeros(len(keys), 0, dtype=torch.bool)
        scores = torch.einsum("bhc,bnc->bhn", q.float(), padded).relu_()
        scores = torch.einsum("bhn,bh->bn", scores, w)
        valid = torch.arange(padded.shape[1])[None, :] < counts[:, None]
        scores = scores.masked_fill(~valid, float("-inf"))
        k = min(self.topk, padded.shape[1])
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
        return torch.zeros_like(valid).scatter_(1, order, True) & valid


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

    def new_state(self, dtype: torch.dtype) -> LayerState:
        return LayerState(
            window=torch.empty(0, self.head_dim, dtype=dtype),
            compressor=self.compressor.new_state(dtype) if self.compressor is not None else None,
            indexer=self.indexer.compressor.new_state(dtype) if self.indexer is not None else None,
        )

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        seqs: list[SeqSlice], states: list[LayerState], simulate_quant: bool,
    ) -> torch.Tensor:  # fmt: skip
        """x [T, d] (attn_norm output) -> [T, d]. `rope` is (inv_freq, cos [T, rd/2], sin)."""
        inv_freq, cos, sin = rope
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        q = apply_rope(rms_scale(q, self.eps), cos, sin)
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)
        if simulate_quant:
            kv = torch.cat((fp8_qdq(kv[:, : -self.rd], 64), kv[:, -self.rd :]), dim=-1)
        comp = self.compressor.project(x) if self.compressor is not None else None
        idx_q = idx_comp = None
        if self.indexer is not None:
            idx_q = self.indexer.queries(x, qr, cos, sin, simulate_quant)
            idx_comp = self.indexer.compressor.project(x)
        if len(seqs) > 1 and all(sq.end - sq.start == 1 for sq in seqs):
            out = self._decode(q, kv, positions, comp, idx_q, idx_comp, states, inv_freq, simulate_quant)
            return self._project_out(apply_rope(out, cos, sin, inverse=True))
        out = torch.empty_like(q)
        for sq, st in zip(seqs, states, strict=True):
            rows = slice(sq.start, sq.end)
            entries, chosen = None, None
            if comp is not None:
                self.compressor.update(st.compressor, comp[0][rows], comp[1][rows], sq.pos0, inv_freq, simulate_quant)
                entries = st.compressor.entries.view()
                chosen = self._compressed_mask(sq, st, positions[rows], idx_q, idx_comp, inv_freq, simulate_quant)
            out[rows] = self._attend(q[rows], kv[rows], positions[rows], st, entries, chosen)
        out = apply_rope(out, cos, sin, inverse=True)
        return self._project_out(out)

    def _compressed_mask(
        self, sq: SeqSlice, st: LayerState, positions: torch.Tensor, idx_q, idx_comp, inv_freq, simulate_quant
    ) -> torch.Tensor:
        """HCA: [S, N] mask of the visible entries; CSA: [S, k] entries picked by the indexer (-1 = none)."""
        n = len(st.compressor.entries)
        if self.indexer is None:  # HCA: every complete block so far
            return torch.arange(n)[None, :] < ((positions + 1) // self.ratio)[:, None]
        rows = slice(sq.start, sq.end)
        self.indexer.compressor.update(
            st.indexer, idx_comp[0][rows], idx_comp[1][rows], sq.pos0, inv_freq, simulate_quant
        )
        q, w = idx_q[0][rows], idx_q[1][rows]
        return self.indexer.select(q, w, st.indexer.entries.view(), positions)

    def _attend(
        self, q: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, st: LayerState,
        entries: torch.Tensor | None, chosen: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        """One chunk: q [S, H, D], kv [S, D] -> [S, H, D]; one softmax per head with the sink.

        Queries run in blocks, each against only the window rows it can see (so the cost
        is linear in S) plus its compressed entries: all visible ones on HCA layers
        (`chosen` is a mask [S, N]), the indexer's picks gathered per query on CSA layers
        (`chosen` is [S, k] entry ids, -1 = none).
        """
        lw, width = st.window.shape[0], self.window
        keys = torch.cat((st.window, kv))  # row j holds position pos0 - lw + j
        st.window = keys[-(width - 1) :] if width > 1 else keys[:0]
        keys = keys.float()
        has_entries = entries is not None and entries.shape[0] > 0
        entries = entries.float() if has_entries else None
        gathered = has_entries and self.indexer is not None
        rows = _block_rows(chosen.shape[1] * self.head_dim if gathered else 0)
        pos0, qf = int(positions[0]), q.float() * self.head_dim**-0.5
        out = torch.empty(q.shape, dtype=torch.float32)
        for b0 in range(0, q.shape[0], rows):
            b1 = min(b0 + rows, q.shape[0])
            k0 = max(0, lw + b0 - (width - 1))
            kw = keys[k0 : lw + b1]
            delta = positions[b0:b1, None] - (pos0 - lw + torch.arange(k0, lw + b1))[None, :]
            mask = (delta >= 0) & (delta < width)
            if has_entries and not gathered:  # HCA: dense over the (few) 128x entries
                kw, mask = torch.cat((kw, entries)), torch.cat((mask, chosen[b0:b1]), dim=1)
            logits = torch.einsum("shd,ld->shl", qf[b0:b1], kw)
            if not gathered:
                out[b0:b1] = torch.einsum("shl,ld->shd", self._softmax_with_sink(logits, mask), kw)
                continue
            picked = chosen[b0:b1]
            picked_keys = entries[picked.clamp(min=0)]  # [Sb, k, D]
            logits = torch.cat((logits, torch.einsum("shd,skd->shk", qf[b0:b1], picked_keys)), dim=-1)
            probs = self._softmax_with_sink(logits, torch.cat((mask, picked >= 0), dim=1))
            out[b0:b1] = torch.einsum("shl,ld->shd", probs[..., : kw.shape[0]], kw) + torch.einsum(
                "shk,skd->shd", probs[..., kw.shape[0] :], picked_keys
            )
        return out.to(q.dtype)

    def _decode(
        self, q, kv, positions, comp, idx_q, idx_comp, states: list[LayerState], inv_freq, simulate_quant
    ) -> torch.Tensor:
        """Decode step, one token per sequence, as one batch: q [B, H, D], kv [B, D] -> [B, H, D].

        Each row's keys are [its compressed entries | its window rows | its new row],
        padded to the longest row; every existing entry is visible to a decode query (an
        entry exists once its block is complete), CSA rows keep only the indexer's top-k.
        """
        n_entries = torch.zeros(len(states), dtype=torch.int64)
        chosen = None
        if comp is not None:
            self.compressor.update_rows([st.compressor for st in states], *comp, positions, inv_freq, simulate_quant)
            n_entries = torch.tensor([len(st.compressor.entries) for st in states])
            if self.indexer is not None:
                idx_states = [st.indexer for st in states]
                self.indexer.compressor.update_rows(idx_states, *idx_comp, positions, inv_freq, simulate_quant)
                chosen = self.indexer.select_rows(*idx_q, [st.entries.view() for st in idx_states])
        rows = []
        for i, st in enumerate(states):
            window = torch.cat((st.window, kv[i : i + 1]))
            entries = st.compressor.entries.view() if st.compressor is not None else window[:0]
            rows.append(torch.cat((entries, window)))
            st.window = window[-(self.window - 1) :] if self.window > 1 else window[:0]
        lengths = torch.tensor([r.shape[0] for r in rows])
        keys = nn.utils.rnn.pad_sequence(rows, batch_first=True).float()  # [B, L, D]
        slot = torch.arange(keys.shape[1])[None, :]
        mask = slot < lengths[:, None]
        if chosen is not None:  # CSA: entries outside the top-k are masked
            width = min(chosen.shape[1], keys.shape[1])
            is_entry = slot[:, :width] < n_entries[:, None]
            mask[:, :width] &= ~is_entry | chosen[:, :width]
        logits = torch.einsum("bhd,bld->bhl", q.float(), keys) * self.head_dim**-0.5
        out = torch.einsum("bhl,bld->bhd", self._softmax_with_sink(logits, mask), keys)
        return out.to(q.dtype)

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
