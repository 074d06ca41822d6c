"""The physical KV pool: slots, pages, and batched decode over page tables.

Oracles: each sequence run alone (one per batch) against the same sequences decoded
together with their chunks of every shape in one batch; the pages a sequence holds
against ceil(tokens / page_size); a pool poisoned with NaN everywhere nobody wrote.
"""

from __future__ import annotations

import math

import pytest
import torch

from workers.indexer import top_k_stable
from workers.kv_pool import KVPool, KVPoolError
from workers.model import Batch
from workers.step import SamplingParams, SeqWork, StepPlan
from workers.weights import load_model
from workers.worker import ModelWorker


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, dtype=torch.float32, simulate_quant=False, progress=False)


@torch.inference_mode()  # the pool's tensors are inference tensors
def _poison(pool: KVPool) -> None:
    for layer in pool.layers:
        layer.window.fill_(float("nan"))
        for comp in (layer.compressor, layer.indexer):
            if comp is not None:
                for t in (comp.ring_kv, comp.ring_score, comp.entries):
                    t.fill_(float("nan"))


def test_batched_steps_match_each_sequence_alone(model):
    """Decode rows at every phase of the 4- and 128-token blocks, and steps mixing decodes
    with a prefill chunk, give each sequence the logits it gets alone."""
    gen = torch.Generator().manual_seed(0)
    lens = [1, 3, 110, 115, 121, 126, 246, 255]  # all phases of a 4-block; all but two close a 128-block
    prompts = [torch.randint(3, 120000, (n,), generator=gen) for n in lens]
    steps = 20
    nxt = torch.randint(3, 120000, (len(lens), steps), generator=gen)
    model.configure_kv(page_size=128, slots=len(lens) + 1, pages=64)
    _poison(model.kv)
    states = [model.new_state() for _ in lens]
    model(Batch.build(prompts, states), states)
    together = []
    for t in range(steps):
        chunks, sts = [nxt[i, t : t + 1] for i in range(len(lens))], list(states)
        if t % 3 == 0:  # a prefill chunk in the same step: the per-sequence path runs the decodes
            sts.append(model.new_state())
            chunks.append(torch.randint(3, 120000, (5 + t % 7,), generator=gen))
        batch = Batch.build(chunks, sts)
        streams = model(batch, sts)
        together.append(model.logits(streams[[sq.end - 1 for sq in batch.seqs[: len(lens)]]]))
        if len(sts) > len(lens):
            sts[-1].free()
    assert all(torch.isfinite(x).all() for x in together)
    model.configure_kv()
    for i, p in enumerate(prompts):
        st = model.new_state()
        model(Batch.build([p], [st]), [st])
        for t in range(steps):
            alone = model.logits(model(Batch.build([nxt[i, t : t + 1]], [st]), [st]))[0]
            torch.testing.assert_close(alone, together[t][i], rtol=1e-4, atol=1e-4, msg=f"seq {i} step {t}")
        st.free()


def test_pages_follow_raw_tokens_and_are_reused(model):
    model.configure_kv(page_size=128)
    pool = model.kv
    gen = torch.Generator().manual_seed(1)
    for n in (1, 128, 129, 300):
        st = model.new_state()
        model(Batch.build([torch.randint(3, 1000, (n,), generator=gen)], [st]), [st])
        assert len(st.pages) == math.ceil(n / 128) and pool.used_pages == len(st.pages) and pool.used_slots == 1
        st.free()
        st.free()  # idempotent
        assert pool.used_pages == 0 and pool.used_slots == 0
    assert pool.capacity[1] <= 4  # the 300-token sequence's 3 pages, reused by every later one


def test_worker_frees_every_page(model):
    model.configure_kv(page_size=128)
    worker = ModelWorker(model)
    gen = torch.Generator().manual_seed(2)
    work = tuple(SeqWork(f"r{i}", tuple(torch.randint(3, 1000, (50 * i + 1,), generator=gen).tolist()), 0, True)
                 for i in range(4))  # fmt: skip
    params = {w.uid: SamplingParams(temperature=0.0) for w in work}
    worker.execute(StepPlan(work=work, sampling=params, num_generated={w.uid: 0 for w in work}))
    assert model.kv.used_pages == sum(math.ceil(len(w.token_ids) / 128) for w in work) and model.kv.used_slots == 4
    worker.execute(StepPlan(work=(), finished=tuple(w.uid for w in work)))
    assert model.kv.used_pages == 0 and model.kv.used_slots == 0 and worker.num_states() == 0


def test_page_size_must_divide_into_entries(model):
    with pytest.raises(KVPoolError, match="not a multiple of compress ratio 128"):
        model.configure_kv(page_size=64)
    model.configure_kv()
    other = KVPool([blk.attn for blk in model.layers], torch.float32)
    with pytest.raises(KVPoolError, match="does not belong to this pool"):
        model(Batch.build([torch.tensor([5, 6])], [other.new_seq()]), [other.new_seq()])


def test_indexer_tiles_pick_what_the_kernel_reference_picks(model):
    """The indexer scores keys a tile at a time with a running top-k (rows in blocks): any
    tile picks what `kernels.indexer_topk_ref` (all scores at once, a stable sort) picks,
    for shared keys (a prefill chunk) and per-row keys (a decode batch); ties go to the
    earlier entry."""
    from kernels.indexer_topk import indexer_topk_ref

    indexer = next(blk.attn.indexer for blk in model.layers if blk.attn.indexer is not None)
    gen = torch.Generator().manual_seed(6)
    b, n, nh, c = 5, 300, indexer.n_heads, indexer.head_dim
    keys = torch.randn(b, n, c, generator=gen)
    q, w = torch.randn(b, nh, c, generator=gen), torch.randn(b, nh, generator=gen)
    counts = torch.tensor([300, 1, 0, 17, 150])
    k = min(indexer.topk, n)
    per_row = lambda t0, t1: keys[:, t0:t1]  # noqa: E731
    expect = torch.stack([indexer_topk_ref(q[i : i + 1], w[i : i + 1], keys[i], counts[i : i + 1], k)[0]
                          for i in range(b)]).long()  # fmt: skip
    shared = indexer_topk_ref(q, w, keys[0], counts, k).long()
    for tile in (1, 7, 64, n):
        assert torch.equal(indexer.select(q, w, counts, per_row, tile=tile), expect), tile
        assert torch.equal(indexer.select(q, w, counts, lambda t0, t1: keys[0, t0:t1], tile=tile), shared), tile
    assert (expect[1] >= 0).sum() == 1 and (expect[2] < 0).all() and (expect[3] >= 0).sum() == min(k, 17)
    ties = indexer.select(torch.zeros_like(q), w, counts, per_row, tile=7)  # every score 0
    assert ties[0].tolist() == list(range(k)) and ties[4].tolist() == list(range(k))


def test_top_k_stable_is_a_stable_sort_prefix():
    gen = torch.Generator().manual_seed(9)
    for width, k in ((50, 7), (50, 50), (3, 5), (1000, 16)):
        scores = torch.randint(0, 6, (8, width), generator=gen).float()  # many ties
        scores[0] = float("-inf")  # a row with nothing visible
        scores[1, width // 2 :] = float("-inf")
        scores[2] = torch.randn(width, generator=gen)  # no ties: topk's own pick (the fast path)
        scores[3, ::2] = torch.randn((width + 1) // 2, generator=gen)  # ties only below the k-th value
        want = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(top_k_stable(scores, k), want), (width, k)


@pytest.mark.parametrize("n", [3, 4, 130])  # no compressed entry yet, the first 4x entry, the first 128x one
def test_export_import_continues_exactly(model, n):
    """A state exported (the KV handoff's message) and imported into a new slot decodes the
    next token to the same logits as the original, down to states with no entries yet."""
    ids = torch.randint(3, model.cfg.vocab_size, (n + 1,), generator=torch.Generator().manual_seed(n))
    st = model.new_state()
    model(Batch.build([ids[:n]], [st]), [st])
    exported = model.kv.export(st)
    assert [[e.shape[0] for e in layer] for layer in exported.entries] == [
        [n // c.ratio for c in (layer.compressor, layer.indexer) if c is not None] for layer in model.kv.layers]
    twin = model.kv.import_(exported)
    logits = [model.logits(model(Batch.build([ids[n:]], [s]), [s])) for s in (st, twin)]
    assert torch.equal(logits[0], logits[1])
    st.free()
    twin.free()
