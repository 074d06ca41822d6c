"""The DeepSeek-V4 transformer in pure torch, over a flat batch of sequence chunks.

Reads in the order of the reference `inference/model.py` (docs/model.md §2): embed -> n residual
streams -> blocks (mHC around attention and MoE) -> HC head -> final norm -> head.

Unlike the reference (one `start_pos` per batch), every sequence brings its own
`SeqState` (a slot and pages in the model's `KVPool`) and chunk, so prefill chunks of any
size and decode tokens mix in one call.
Legend: T tokens in the flat batch, n = hc_mult, d = hidden size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workers.attention import Attention, SeqSlice
from workers.config import ModelConfig
from workers.kv_pool import KVPool, LayerPool, SeqState, StepView
from workers.layers import Linear, RMSNorm, hc_head, hc_post, hc_pre, rope_cos_sin, rope_inv_freq
from workers.moe import MoE


@dataclass(frozen=True)
class Batch:
    """A flat batch: sequence i's chunk is rows seqs[i].start:seqs[i].end of the inputs."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] absolute position of each token in its sequence
    seqs: list[SeqSlice]

    @classmethod
    def build(
        cls, chunks: list[torch.Tensor], states: list[SeqState],
        parts: list[tuple[int, tuple[int, int]] | None] | None = None,
    ) -> Batch:  # fmt: skip
        """Chunks of token ids (1-D, non-empty), each continuing its state; or, where
        `parts[i]` is (pos0, (a, b)), this rank's part at pos0 of a context-parallel chunk
        [a, b) of a state at a (workers/cp.py)."""
        seqs, positions, start = [], [], 0
        for i, (ids, st) in enumerate(zip(chunks, states, strict=True)):
            n = ids.shape[0]
            part = parts[i] if parts is not None else None
            pos0, chunk = (st.num_tokens, None) if part is None else part
            if chunk is not None and not (st.num_tokens == chunk[0] <= pos0 and pos0 + n <= chunk[1]):
                raise ValueError(f"part at {pos0} ({n} tokens) of chunk {chunk}: the state is at {st.num_tokens}")
            seqs.append(SeqSlice(start, start + n, pos0, chunk))
            positions.append(torch.arange(pos0, pos0 + n))
            start += n
        if not chunks:  # an empty step: an expert-parallel worker with no tokens still runs every layer
            return cls(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), [])
        return cls(torch.cat(chunks).long(), torch.cat(positions), seqs)


    def to(self, device: torch.device) -> Batch:
        if self.input_ids.device == device and self.positions.device == device:
            return self
        return Batch(self.input_ids.to(device), self.positions.to(device), self.seqs)


class Block(nn.Module):
    """One layer: mHC(attention) then mHC(MoE); parameter names follow the checkpoint."""

    def __init__(
        self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype, expert_ids: list[int] | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        n, d = cfg.hc_mult, cfg.hidden_size
        mix = (2 + n) * n
        self.attn = Attention(cfg, layer_id, dtype)
        self.ffn = MoE(cfg, layer_id, dtype, expert_ids)
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(d, cfg.rms_norm_eps)
        for part in ("attn", "ffn"):
            self.register_parameter(f"hc_{part}_fn", _param(mix, n * d))
            self.register_parameter(f"hc_{part}_base", _param(mix))
            self.register_parameter(f"hc_{part}_scale", _param(3))
        ratio = cfg.compress_ratio(layer_id)
        base = cfg.compress_rope_theta if ratio else cfg.rope_theta
        yarn = cfg.rope_scaling if ratio else None  # YaRN only on compressed layers
        self.register_buffer("inv_freq", rope_inv_freq(cfg.qk_rope_head_dim, base, yarn), persistent=False)

    def forward(
        self, x: torch.Tensor, batch: Batch, pool: LayerPool, view: StepView, rope: dict, simulate_quant: bool
    ) -> torch.Tensor:
        """x [T, n, d] -> [T, n, d]; `pool` holds this layer's KV, `view` the batch's slots and pages."""
        c = self.cfg
        key = "compress" if self.attn.ratio else "main"
        if key not in rope:
            rope[key] = (self.inv_freq, *rope_cos_sin(self.inv_freq, batch.positions))
        u, post, comb = hc_pre(x, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base,
                               c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)  # fmt: skip
        v = self.attn(self.attn_norm(u), batch.positions, rope[key], batch.seqs, pool, view, simulate_quant)
        x = hc_post(v, x, post, comb)
        u, post, comb = hc_pre(x, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base,
                               c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)  # fmt: skip
        v = self.ffn(self.ffn_norm(u), batch.input_ids)
        return hc_post(v, x, post, comb)


class MTPBlock(Block):
    """Multi-token prediction block (docs/model.md §7): a full Block fed with the main model's
    streams at t and the embedding of token t+1; shares embed and head with the model."""

    def __init__(
        self, cfg: ModelConfig, layer_id: int, dtype: torch.dtype, expert_ids: list[int] | None = None
    ) -> None:
        super().__init__(cfg, layer_id, dtype, expert_ids)
        d, n = cfg.hidden_size, cfg.hc_mult
        self.e_proj = Linear(d, d, dtype)
        self.h_proj = Linear(d, d, dtype)
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.hc_head_fn = _param(n, n * d)
        self.hc_head_base = _param(n)
        self.hc_head_scale = _param(1)


class Transformer(nn.Module):
    """DeepSeek-V4 (main model + MTP blocks). Parameter names are the checkpoint's names.

    `expert_ids` (default: all) are the routed experts this instance holds in every layer.
    """

    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, simulate_quant: bool = True,
        expert_ids: list[int] | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.cfg, self.dtype, self.simulate_quant = cfg, dtype, simulate_quant
        n, d = cfg.hc_mult, cfg.hidden_size
        self.embed = nn.Embedding(cfg.vocab_size, d, dtype=dtype)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(cfg, i, dtype, expert_ids) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.head = Linear(d, cfg.vocab_size, torch.float32)
        self.hc_head_fn = _param(n, n * d)
        self.hc_head_base = _param(n)
        self.hc_head_scale = _param(1)
        n_main = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(
            MTPBlock(cfg, n_main + k, dtype, expert_ids) for k in range(cfg.num_nextn_predict_layers)
        )
        self.after_layer: Callable[[int], None] | None = None  # called after each layer (KV handoff export)
        self.configure_kv()

    # -- state ------------------------------------------------------------------------
    def configure_kv(self, page_size: int = 128, slots: int = 1, pages: int = 1) -> None:
        """(Re)create the KV pools: pages of `page_size` raw tokens, allocated up front for
        `slots` sequences and `pages` pages (both grow on demand). Drops every sequence."""
        dev = self.embed.weight.device
        self.kv = KVPool([blk.attn for blk in self.layers], self.dtype, page_size, dev)
        self.kv.reserve(slots, pages)
        self.mtp_kv = [KVPool([blk.attn], self.dtype, page_size, dev) for blk in self.mtp]

    def new_state(self) -> SeqState:
        return self.kv.new_seq()

    def new_mtp_state(self, k: int = 0) -> SeqState:
        return self.mtp_kv[k].new_seq()

    def lay_out_head(self) -> None:
        """Store the head's weight column-major (its [d, vocab] transpose contiguous, still
        seen as [vocab, d]). A decode step's head GEMM is a few rows against the whole vocab;
        CPU BLAS reads this layout 2.6x faster for 1 row and 1.3x for 32 (`dsv4 bench decode`).
        Same values; the GEMM's fp32 rounding may differ in the last bit."""
        w = self.head.weight
        w.data = w.data.t().contiguous().t()

    def set_kernel_path(self, on: bool | None) -> None:
        """Attention through kernels/ (True), pure torch (False), or per device (None: GPU -> kernels)."""
        for blk in (*self.layers, *self.mtp):
            blk.attn.kernel_path = on

    # -- forward ----------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: Batch, states: list[SeqState]) -> torch.Tensor:
        """Run the chunks; returns the final residual streams [T, n, d] and advances states."""
        batch = batch.to(self.embed.weight.device)
        x = self.embed(batch.input_ids).unsqueeze(1).repeat(1, self.cfg.hc_mult, 1)
        view = self.kv.view(states, [grows_by(sq, st) for sq, st in zip(batch.seqs, states, strict=True)])
        rope: dict = {}
        for i, (blk, pool) in enumerate(zip(self.layers, self.kv.layers, strict=True)):
            x = blk(x, batch, pool, view, rope, self.simulate_quant)
            if self.after_layer is not None:
                self.after_layer(i)
        for sq, st in zip(batch.seqs, states, strict=True):
            st.num_tokens += grows_by(sq, st)
        return x

    @torch.inference_mode()
    def logits(self, streams: torch.Tensor) -> torch.Tensor:
        """[T, n, d] residual streams -> [T, vocab] fp32 logits."""
        c = self.cfg
        u = hc_head(streams, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, c.hc_eps, c.rms_norm_eps)
        return F.linear(self.norm(u).float(), self.head.weight)

    @torch.inference_mode()
    def mtp_logits(self, streams: torch.Tensor, next_ids: torch.Tensor, batch: Batch,
                   states: list[SeqState], k: int = 0) -> torch.Tensor:  # fmt: skip
        """Score token t+2 from the main streams at t [T, n, d] and token t+1 `next_ids` [T]."""
        blk, c = self.mtp[k], self.cfg
        next_ids = next_ids.to(self.embed.weight.device)
        e = blk.enorm(self.embed(next_ids))
        x = blk.e_proj(e).unsqueeze(1) + blk.h_proj(blk.hnorm(streams))
        mtp_batch = Batch(next_ids.long(), batch.positions, batch.seqs).to(self.embed.weight.device)
        view = self.mtp_kv[k].view(states, [sq.end - sq.start for sq in batch.seqs])
        x = blk(x.to(self.dtype), mtp_batch, self.mtp_kv[k].layers[0], view, {}, self.simulate_quant)
        for sq, st in zip(batch.seqs, states, strict=True):
            st.num_tokens += sq.end - sq.start
        u = hc_head(x, blk.hc_head_fn, blk.hc_head_scale, blk.hc_head_base, c.hc_eps, c.rms_norm_eps)
        return F.linear(blk.norm(u).float(), self.head.weight)


def grows_by(sq: SeqSlice, st: SeqState) -> int:
    """Tokens a step adds to a state: its rows, or a whole context-parallel chunk (every
    rank's replica takes the state of the chunk; see workers/cp.py)."""
    return sq.end - sq.start if sq.chunk is None else sq.chunk[1] - st.num_tokens


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=torch.float32), requires_grad=False)
