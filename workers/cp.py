"""Context-parallel prefill (docs/architecture.md §6): one long prompt's chunk split over the W workers
of a prefill instance, each running every layer on its own consecutive rows, so a prompt
of N tokens takes about 1/W of the attention time.

Applied from outside the model (docs/style.md §5): `apply_context_parallel(model, comm)` gives
every attention layer a `ContextParallel`; a batch marks the sequence whose chunk is
split (`SeqSlice.chunk`, built by `cp_batch`). Ranks hold parts in rank order: rank r has
positions [a_r, b_r), a_0 = the chunk start, b_{W-1} = its end, every part non-empty.

Every rank keeps a full replica of the sequence's V4 state (the compressed state is
small), so what a layer must exchange is small too -- per layer and rank:

1. tails: the last rows of its part that the next parts continue from: window kv rows
   (at most `ring`) and each compressor's projected rows and biased scores (at most its
   ring: 8 on CSA layers, 128 on HCA layers). Rank r writes the tails of ranks < r into
   its rings, so its rings are exactly those of a single worker at a_r; it then runs
   the layer's own compressor and window update on its part, as a chunk at a_r.
2. entries: the compressed entries and indexer keys of the blocks that complete in its
   part (N/4 and N/128 of the rows, the "small because compressed" state). Each rank
   writes the others' into its replica; attention masks entries by position, so a query
   never sees an entry from after itself.

After the layer every rank writes the tails of the ranks after it: all replicas then
hold the state of the whole chunk, and any rank can own the sequence afterwards. The
result equals a single worker's chunked prefill (same state, same picks; tested).
Legend: S rows of this rank's part, D head dim, P projection width.
"""

from __future__ import annotations

import math

import torch

from router.comm import Communicator
from workers.attention import Attention, ChunkRows, SeqSlice
from workers.kv_pool import CompressorPool, LayerPool, SeqState
from workers.model import Batch, Transformer


class ContextParallel:
    """One rank's end of context-parallel prefill over `comm` (all ranks join every exchange)."""

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm

    def all_gather(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """This rank's tensors (any rows; trailing dims and dtypes the same on every rank) ->
        every rank's, by rank. Two collectives: the row counts, then the rows as fp32
        (exact for the fp32 and bf16 values exchanged here)."""
        w = self.comm.world_size
        dev = tensors[0].device if tensors else None
        rows = torch.tensor([t.shape[0] for t in tensors], dtype=torch.int64, device=dev)
        counts = self._gather(rows).view(w, -1)
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors]) if tensors else torch.empty(0, device=dev)
        data = self._gather(flat)  # on the communicator's device (nccl: the GPU's)
        out, at = [], 0
        for rank in range(w):
            mine = []
            for t, n in zip(tensors, counts[rank].tolist(), strict=True):
                size = n * math.prod(t.shape[1:])
                mine.append(data[at : at + size].view(n, *t.shape[1:]).to(t.dtype).to(t.device))
                at += size
            out.append(mine)
        return out

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [n] on every rank -> concatenation in rank order (an all-to-all sending x to all)."""
        w = self.comm.world_size
        recv = self.comm.all_to_all_splits(torch.full((w,), x.shape[0], dtype=torch.int64))
        return self.comm.all_to_all(x.repeat(w), [x.shape[0]] * w, recv.tolist())

    def prefill(
        self, attn: Attention, c: ChunkRows, sq: SeqSlice, at: tuple[int, torch.Tensor, LayerPool],
        inv_freq: torch.Tensor, simulate_quant: bool, fused: bool,
    ) -> torch.Tensor:  # fmt: skip
        """This rank's part of one layer's chunk -> its attention output [S, H, D]; the
        replica's state ends as that of the whole chunk (see the module docstring)."""
        slot, table, pool = at
        rank, pos0, end = self.comm.rank, sq.pos0, sq.pos0 + c.kv.shape[0]
        comps = _compressors(attn, pool)
        mine = [torch.tensor([[pos0, end]], device=c.kv.device), _tail(c.kv, pool.ring)]
        for comp, cpool, rows in zip(comps[0], comps[1], (c.comp, c.idx_comp), strict=False):
            score = rows[1] + comp.ape[c.positions % comp.ratio]  # the ring holds biased scores
            mine += [_tail(rows[0], cpool.ring), _tail(score, cpool.ring)]
        tails = self.all_gather(mine)
        for other in tails[:rank]:
            _write_tails(pool, slot, other, comps[1])
        before = attn.window_before(at, pos0)
        entries = None
        if c.comp is not None:
            attn.compress(c, pos0, at, inv_freq, simulate_quant)
            new = [cp.read(table, _ids(pos0, end, cp.ratio, table.device)) for cp in comps[1]]
            for other, (got, part) in enumerate(zip(self.all_gather(new), tails, strict=True)):
                a, b = part[0][0].tolist()
                for cp, value in zip(comps[1], got, strict=True):
                    if other != rank:
                        cp.write(table, _ids(a, b, cp.ratio, table.device), value)
            chunk_end = sq.chunk[1]
            n_keys = chunk_end // 4 if attn.indexer is not None else 0
            entries = attn.chunk_entries(c, at, chunk_end // attn.ratio, n_keys, fused)
        out = (attn._attend_fused if fused else attn._attend)(c.q, c.kv, c.positions, before, entries)
        attn.keep_window(at, pos0, c.kv)
        for other in tails[rank + 1 :]:
            _write_tails(pool, slot, other, comps[1])
        return out


def _compressors(attn: Attention, pool: LayerPool) -> tuple[list, list[CompressorPool]]:
    """The layer's compressors (main, then the indexer's) and their pools."""
    mods = [m for m in (attn.compressor, attn.indexer.compressor if attn.indexer else None) if m is not None]
    return mods, [p for p in (pool.compressor, pool.indexer) if p is not None]


def _tail(rows: torch.Tensor, ring: int) -> torch.Tensor:
    return rows[max(0, rows.shape[0] - ring) :]


def _ids(a: int, b: int, ratio: int, device: torch.device) -> torch.Tensor:
    """Ids of the entries whose blocks complete in positions [a, b)."""
    return torch.arange(a // ratio, b // ratio, device=device)


def _write_tails(pool: LayerPool, slot: int, part: list[torch.Tensor], cpools: list[CompressorPool]) -> None:
    """Put another rank's tails (`part`: [[a, b]], window rows, then per compressor its kv
    and score rows) into this replica's rings, at the positions they end at (b)."""
    end = int(part[0][0, 1])
    kv = part[1]
    pos = torch.arange(end - kv.shape[0], end, device=kv.device)
    pool.window[slot, pos % pool.ring] = kv.to(pool.window.dtype)
    for i, cp in enumerate(cpools):
        rows_kv, rows_score = part[2 + 2 * i], part[3 + 2 * i]
        pos = torch.arange(end - rows_kv.shape[0], end, device=rows_kv.device) % cp.ring
        cp.ring_kv[slot, pos] = rows_kv
        cp.ring_score[slot, pos] = rows_score


def apply_context_parallel(model: Transformer, comm: Communicator) -> Transformer:
    """Let `model` run context-parallel chunks over `comm` (every rank applies it to its model)."""
    for blk in model.layers:
        blk.attn.cp = ContextParallel(comm)
    return model


def split_chunk(start: int, end: int, world_size: int, align: int = 128) -> list[tuple[int, int]]:
    """Positions [start, end) in `world_size` consecutive non-empty parts of about equal size,
    inner boundaries on multiples of `align` where the chunk allows (whole compressor
    blocks per part; any boundary is correct)."""
    n = end - start
    if n < world_size:
        raise ValueError(f"a chunk of {n} tokens cannot be split over {world_size} ranks")
    cuts = [start]
    for r in range(1, world_size):
        cut = start + n * r // world_size
        aligned = (cut + align // 2) // align * align
        cut = aligned if cuts[-1] < aligned <= end - (world_size - r) else cut
        cuts.append(max(cut, cuts[-1] + 1))
    cuts.append(end)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def cp_batch(token_ids: torch.Tensor, state: SeqState, part: tuple[int, int], chunk: tuple[int, int]) -> Batch:
    """A batch holding this rank's part [a, b) of a context-parallel chunk of one sequence;
    `state` (this rank's replica) is at the chunk start and `token_ids` are the part's tokens."""
    if token_ids.shape[0] != part[1] - part[0]:
        raise ValueError(f"part {part} with {token_ids.shape[0]} tokens")
    return Batch.build([token_ids], [state], [(part[0], chunk)])
