"""The KV compressor of DeepSeek-V4 attention (docs/model.md §4.3): gated pooling of `ratio`
consecutive tokens into one compressed entry, written to the layer's compressor pool.

Legend: T tokens of the flat batch, S tokens of one sequence's chunk, B sequences of a decode
batch, c compressor width, coff = 2 when blocks overlap (ratio 4) else 1, rd rope dims.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels
from kernels.quant import fp4_qdq, fp8_qdq, hadamard
from kernels.rmsnorm_rope import apply_rope
from workers.config import ModelConfig
from workers.kv_pool import CompressorPool, StepView
from workers.layers import Linear, RMSNorm


class Compressor(nn.Module):
    """Gated pooling of `ratio` consecutive tokens into one entry (docs/model.md §4.3).

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
        blocks completed this step (rows `view.closing[ratio]`, known on the host) are
        pooled together in one batch."""
        r, ring = self.ratio, pool.ring
        score = score + self.ape[positions % r]
        pool.ring_kv[view.slots, positions % ring] = kv
        pool.ring_score[view.slots, positions % ring] = score
        closing = view.closing[r]
        if closing.numel() == 0:  # a host-side shape: no sync
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
