"""Lightning-indexer scores fused with top-k selection (docs/model.md §4.4).

Legend: T queries, nI indexer heads, cI indexer head dim, N key entries, k picks; paged:
B rows (one decode query per sequence), R pool rows, P pages per table, epp entries per page.

    score[t, j] = sum_h w[t, h] * relu(q[t, h] . keys[j])      for j < visible_len[t]
    ids[t]      = the k visible entries with the highest scores, best first;
                  ties go to the earlier entry; -1 fills the rest when fewer are visible.

`indexer_topk` scores every query against one shared key tensor (a prefill chunk);
`indexer_topk_paged` gives each row b its own keys in a paged pool (a decode batch):
keys[j] of row b = pool[page_table[b, j // epp] * epp + j % epp], visible_len = counts.

The kernel never materialises [T, N] scores: one program per query streams the visible
keys in chunks of KP = next_pow2(k) entries and keeps a running top-KP in registers. Each
(score, entry) pair is packed into one int64 whose order is (score desc, entry asc), so
sorting keys both ranks and breaks ties. A chunk whose best key cannot enter the running
set is skipped; otherwise a bitonic network sorts it ascending, the elementwise max with
the running set (sorted descending) leaves the top KP of both as a bitonic sequence, and
one bitonic merge sorts that. The network is written out with reshape/split/join, without
`tl.sort`, which the interpreter runs far slower. One kernel body serves both variants:
with PAGED the row of each key is looked up through the program's page table.
"""

from __future__ import annotations

import torch

from kernels._triton import interpreting, kernel, next_pow2, tl

_REF_BLOCK_ELEMS = 1 << 24  # [T_b, nI, N] fp32 scores per reference block (64 MiB)


def _check(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, visible_len: torch.Tensor, k: int) -> None:
    t, nh, c = q.shape
    if w.shape != (t, nh) or keys.dim() != 2 or keys.shape[1] != c or visible_len.shape != (t,) or k < 1:
        raise ValueError(
            f"indexer_topk: q {tuple(q.shape)}, w {tuple(w.shape)}, keys {tuple(keys.shape)}, "
            f"visible_len {tuple(visible_len.shape)}, k={k} do not fit q [T, nI, cI], w [T, nI], "
            "keys [N, cI], visible_len [T], k >= 1"
        )
    if q.dtype != keys.dtype:
        raise ValueError(f"indexer_topk: q is {q.dtype} but keys are {keys.dtype}")


def _output(t: int, k: int, device: torch.device, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(t, k, dtype=torch.int32, device=device)
    if out.shape != (t, k) or out.dtype != torch.int32:
        raise ValueError(f"out must be ({t}, {k}) int32, got {tuple(out.shape)} {out.dtype}")
    return out


def indexer_topk_ref(
    q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, visible_len: torch.Tensor, k: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """q [T, nI, cI], w [T, nI], keys [N, cI], visible_len [T] int -> entry ids [T, k] int32 (-1 = none).

    Pure torch in fp32, in query blocks; a stable descending sort gives ties to the earlier entry.
    """
    _check(q, w, keys, visible_len, k)
    t, nh, _ = q.shape
    n = keys.shape[0]
    o = _output(t, k, q.device, out)
    o.fill_(-1)
    if n == 0:
        return o
    keysf = keys.float()
    rows = max(1, _REF_BLOCK_ELEMS // max(1, nh * n))
    for b0 in range(0, t, rows):
        scores = torch.einsum("shc,nc->shn", q[b0 : b0 + rows].float(), keysf).relu_()
        scores = torch.einsum("shn,sh->sn", scores, w[b0 : b0 + rows].float())
        visible = torch.arange(n, device=q.device)[None, :] < visible_len[b0 : b0 + rows, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
        picks = torch.where(visible.gather(1, order), order, -1)
        o[b0 : b0 + rows, : picks.shape[1]] = picks.to(torch.int32)
    return o


@kernel
def _indexer_topk_kernel(
    q_ptr, w_ptr, keys_ptr, table_ptr, vis_ptr, out_ptr,
    NH, C, N, K, EPP,
    stride_qt, stride_qh, stride_wt, stride_kn, stride_pt, stride_ot,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, KP: tl.constexpr,
    LOG_KP: tl.constexpr, DOT_F32: tl.constexpr, PAGED: tl.constexpr,
):  # fmt: skip
    """One program per query t = program_id(0); chunks of KP entries, R = KP / BLOCK_N tiles each.

    N: the entries a query may address (keys rows; paged: P * EPP). PAGED: entry j of query t is
    keys row table[t, j // EPP] * EPP + j % EPP (table_ptr is unused otherwise)."""
    t = tl.program_id(0).to(tl.int64)  # offsets like t * stride_qt may pass 2^31
    heads = tl.arange(0, BLOCK_H)
    chans = tl.arange(0, BLOCK_C)
    h_ok = heads < NH
    c_ok = chans < C
    q = tl.load(q_ptr + t * stride_qt + heads[:, None] * stride_qh + chans[None, :],
                mask=h_ok[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
    if DOT_F32:
        q = q.to(tl.float32)
    w = tl.load(w_ptr + t * stride_wt + heads, mask=h_ok, other=0.0).to(tl.float32)
    vis = tl.minimum(tl.load(vis_ptr + t), N)
    sentinel = -9223372036854775807 - 1  # below every packed (score, entry) key
    best = tl.full((KP,), sentinel, tl.int64)  # running top-KP, sorted descending
    floor = tl.min(best, axis=0)  # smallest key in `best`: a chunk must beat it to matter
    tile_row = tl.arange(0, KP // BLOCK_N)[:, None]
    for n0 in range(0, vis, KP):
        chunk = tl.full((KP // BLOCK_N, BLOCK_N), sentinel, tl.int64)
        for r in tl.static_range(KP // BLOCK_N):
            ents = n0 + r * BLOCK_N + tl.arange(0, BLOCK_N)
            e_ok = ents < vis
            if PAGED:  # masked: pages past the visible entries may be padding
                page = tl.load(table_ptr + t * stride_pt + ents // EPP, mask=e_ok, other=0).to(tl.int64)
                rows = page * EPP + (ents % EPP)
            else:
                rows = ents.to(tl.int64)
            kt = tl.load(keys_ptr + rows[:, None] * stride_kn + chans[None, :],
                         mask=e_ok[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
            if DOT_F32:
                kt = kt.to(tl.float32)
            head_scores = tl.maximum(tl.dot(q, tl.trans(kt)), 0.0)  # [BLOCK_H, BLOCK_N]
            score = tl.sum(head_scores * w[:, None], axis=0)
            score = tl.where(score == 0.0, 0.0, score)  # -0.0 ties with +0.0, as in torch's sort
            bits = score.to(tl.int32, bitcast=True)
            ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32 order == float order
            key = (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - ents).to(tl.int64)
            chunk = tl.where(tile_row == r, tl.where(e_ok, key, sentinel)[None, :], chunk)
        chunk = tl.reshape(chunk, (KP,))
        if tl.max(chunk, axis=0) > floor:
            # sort the chunk ascending: bitonic stages st, compare-exchange at distance j = 2^(st-1-jj), viewing
            # the chunk as [KP / 2j, 2, j] (shapes spelled inline: a name bound in a kernel becomes a tensor)
            for st in tl.static_range(1, LOG_KP + 1):
                for jj in tl.static_range(st):
                    pairs = tl.reshape(chunk, (KP >> (st - jj), 2, 1 << (st - 1 - jj)))
                    lo, hi = tl.split(tl.permute(pairs, (0, 2, 1)))  # elements i and i + j
                    small, large = tl.minimum(lo, hi), tl.maximum(lo, hi)
                    up = ((tl.arange(0, KP >> (st - jj)) << (st - jj)) & (1 << st))[:, None] == 0  # ascending run
                    pairs = tl.join(tl.where(up, small, large), tl.where(up, large, small))
                    chunk = tl.reshape(tl.permute(pairs, (0, 2, 1)), (KP,))
            # ... then max(best desc, chunk asc) holds the top KP of both, as a bitonic sequence: merge it
            best = tl.maximum(best, chunk)
            for jj in tl.static_range(LOG_KP):
                pairs = tl.permute(tl.reshape(best, (1 << jj, 2, KP >> (jj + 1))), (0, 2, 1))
                lo, hi = tl.split(pairs)
                best = tl.reshape(tl.permute(tl.join(tl.maximum(lo, hi), tl.minimum(lo, hi)), (0, 2, 1)), (KP,))
            floor = tl.min(best, axis=0)
    ids = (0x7FFFFFFF - (best & 0xFFFFFFFF)).to(tl.int32)
    ids = tl.where(best == sentinel, -1, ids)
    slots = tl.arange(0, KP)
    tl.store(out_ptr + t * stride_ot + slots, ids, mask=slots < K)


def indexer_topk_triton(
    q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, visible_len: torch.Tensor, k: int,
    out: torch.Tensor | None = None, block_n: int = 64, num_warps: int = 4,
) -> torch.Tensor:  # fmt: skip
    """Triton version of `indexer_topk_ref` (same contract); grid [T], registers O(k + nI * cI)."""
    _check(q, w, keys, visible_len, k)
    o = _output(q.shape[0], k, q.device, out)
    _launch(q, w, keys, None, 1, visible_len, k, o, block_n, num_warps)
    return o


def _launch(
    q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, page_table: torch.Tensor | None, epp: int,
    visible_len: torch.Tensor, k: int, o: torch.Tensor, block_n: int, num_warps: int,
) -> None:  # fmt: skip
    """Both variants' launch: one program per query row; page_table None means shared keys."""
    t, nh, c = q.shape
    if t == 0:
        return
    n = keys.shape[0] if page_table is None else page_table.shape[1] * epp
    if n >= 2**31 - 1:
        raise ValueError("indexer_topk packs entry ids into 31 bits")
    q = q if q.stride(2) == 1 else q.contiguous()
    keys, w = keys.contiguous(), w.contiguous()
    table = keys if page_table is None else page_table if page_table.stride(1) == 1 else page_table.contiguous()
    kp = max(16, next_pow2(k))
    interp = interpreting(q.device)
    _indexer_topk_kernel[(t,)](
        q, w, keys, table, visible_len.to(torch.int32).contiguous(), o,
        nh, c, n, k, epp,
        q.stride(0), q.stride(1), w.stride(0), keys.stride(0), table.stride(0), o.stride(0),
        BLOCK_H=max(16, next_pow2(nh)), BLOCK_C=max(16, next_pow2(c)), BLOCK_N=min(max(16, block_n), kp), KP=kp,
        LOG_KP=kp.bit_length() - 1,
        DOT_F32=interp or q.dtype == torch.float32, PAGED=page_table is not None, num_warps=num_warps,
    )  # fmt: skip


def _check_paged(
    q: torch.Tensor, w: torch.Tensor, pool: torch.Tensor, page_table: torch.Tensor, epp: int, counts: torch.Tensor,
    k: int,
) -> None:  # fmt: skip
    b = q.shape[0]
    if page_table.dim() != 2 or page_table.shape[0] != b or page_table.is_floating_point() or epp < 1:
        raise ValueError(
            f"indexer_topk_paged: page_table {tuple(page_table.shape)} {page_table.dtype}, epp={epp} do not fit "
            f"page_table [B={b}, P] int, epp >= 1"
        )
    _check(q, w, pool, counts, k)


def indexer_topk_paged_ref(
    q: torch.Tensor, w: torch.Tensor, pool: torch.Tensor, page_table: torch.Tensor, epp: int, counts: torch.Tensor,
    k: int, out: torch.Tensor | None = None, tile: int = 1024,
) -> torch.Tensor:  # fmt: skip
    """q [B, nI, cI], w [B, nI], pool [R, cI], page_table [B, P] int, counts [B] int -> entry ids [B, k]
    int32 (-1 = none): row b is `indexer_topk_ref` over its keys pool[page_table[b, j // epp] * epp + j % epp]
    for j < counts[b] (at most P * epp).

    Pure torch in fp32: each row block gathers its keys `tile` entries at a time and keeps a running
    top-k; the running picks (earlier entries) come first in each stable sort, so ties keep the earlier entry.
    """
    _check_paged(q, w, pool, page_table, epp, counts, k)
    b, nh, c = q.shape
    o = _output(b, k, q.device, out)
    o.fill_(-1)
    vis = counts.clamp(max=page_table.shape[1] * epp)
    rows = max(1, _REF_BLOCK_ELEMS // (max(nh, c) * tile))  # [rows, nI | cI, tile] fp32 per step
    for b0 in range(0, b, rows):
        sl = slice(b0, b0 + rows)
        qf, wf, table, vb = q[sl].float(), w[sl].float(), page_table[sl].long(), vis[sl, None]
        best_s = torch.empty(qf.shape[0], 0, device=q.device)
        best_i = torch.empty(qf.shape[0], 0, dtype=torch.int64, device=q.device)
        n = int(vb.max())
        for t0 in range(0, n, tile):
            ids = torch.arange(t0, min(t0 + tile, n), device=q.device).expand(qf.shape[0], -1)
            ok = ids < vb
            at = torch.where(ok, table.gather(1, ids // epp) * epp + ids % epp, 0)  # padding pages are never read
            scores = torch.einsum("bhc,bnc->bhn", qf, pool[at].float()).relu_()
            scores = torch.einsum("bhn,bh->bn", scores, wf).masked_fill_(~ok, float("-inf"))
            scores, ids = torch.cat((best_s, scores), dim=1), torch.cat((best_i, torch.where(ok, ids, -1)), dim=1)
            order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
            best_s, best_i = scores.gather(1, order), ids.gather(1, order)
        o[sl, : best_i.shape[1]] = best_i.to(torch.int32)
    return o


def indexer_topk_paged_triton(
    q: torch.Tensor, w: torch.Tensor, pool: torch.Tensor, page_table: torch.Tensor, epp: int, counts: torch.Tensor,
    k: int, out: torch.Tensor | None = None, block_n: int = 64, num_warps: int = 4,
) -> torch.Tensor:  # fmt: skip
    """Triton version of `indexer_topk_paged_ref` (same contract); grid [B], registers O(k + nI * cI)."""
    _check_paged(q, w, pool, page_table, epp, counts, k)
    o = _output(q.shape[0], k, q.device, out)
    _launch(q, w, pool, page_table, epp, counts, k, o, block_n, num_warps)
    return o
