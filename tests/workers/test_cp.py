"""Context-parallel prefill (workers/cp.py): a chunk split over W ranks (threads over the
`local` communicator, each with its own copy of the tiny model) against the oracle of one
worker prefilling the same chunk: the same output rows on every rank, every rank's replica
holding the same state, and the same logits when any replica decodes on.

The exact comparison runs with the QAT simulation off: CP sums some rows in another order,
and with FP8/FP4 rounding on, a sum that lands within float noise of a rounding boundary
flips to the neighbouring FP8 value (seen on an AMD EPYC for one element in 16K, from
there on the state differs by that step), which no tolerance on fp32 noise admits. With
the rounding on, the replicas must still decode the same tokens, close to one worker's.
"""

from __future__ import annotations

import copy

import pytest
import torch

from router.comm import run_local
from workers.cp import apply_context_parallel, cp_batch, split_chunk
from workers.model import Batch
from workers.weights import load_model

PREFIX, END = 300, 700  # positions 0..299 prefilled alone, then [300, 700) context-parallel


@pytest.fixture(scope="module", params=[False, True], ids=["exact", "qat"])
def model(tiny_checkpoint, request):
    return load_model(tiny_checkpoint, dtype=torch.float32, simulate_quant=request.param, progress=False)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 129280, (END + 3,), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def reference(model, tokens):
    """One worker: [0, 300), then [300, 700) as one chunk, then three decode steps."""
    model.configure_kv()
    st = model.new_state()
    model(Batch.build([tokens[:PREFIX]], [st]), [st])
    rows = model(Batch.build([tokens[PREFIX:END]], [st]), [st])
    exported = model.kv.export(st)
    decoded = [model.logits(model(Batch.build([tokens[p : p + 1]], [st]), [st])) for p in range(END, END + 3)]
    return rows, exported, decoded


def _context_parallel(model, tokens, parts):
    def rank_fn(comm):
        m = apply_context_parallel(copy.deepcopy(model), comm)
        m.configure_kv()
        st = m.new_state()
        m(Batch.build([tokens[:PREFIX]], [st]), [st])
        a, b = parts[comm.rank]
        rows = m(cp_batch(tokens[a:b], st, (a, b), (PREFIX, END)), [st])
        assert st.num_tokens == END
        exported = m.kv.export(st)
        decoded = [m.logits(m(Batch.build([tokens[p : p + 1]], [st]), [st])) for p in range(END, END + 3)]
        return rows, exported, decoded

    return run_local(len(parts), rank_fn, timeout=120, run_timeout=600)


@pytest.mark.parametrize(
    "parts",
    [
        split_chunk(PREFIX, END, 2),  # at a 128 boundary: [300, 512), [512, 700)
        [(300, 301), (301, 303), (303, 450), (450, 700)],  # parts shorter than every ring, unaligned cuts
    ],
    ids=["two-aligned", "four-ragged"],
)
def test_context_parallel_prefill_equals_one_worker(model, tokens, reference, parts):
    ref_rows, ref_state, ref_decoded = reference
    results = _context_parallel(model, tokens, parts)
    if model.simulate_quant:  # rounding flips: the same tokens, close logits
        for (a, b), (rows, _, decoded) in zip(parts, results, strict=True):
            assert _rel(rows, ref_rows[a - PREFIX : b - PREFIX]) < 1e-2
            for g, w in zip(decoded, ref_decoded, strict=True):
                assert _rel(g, w) < 2e-2 and g.argmax() == w.argmax()
        return
    for (a, b), (rows, state, decoded) in zip(parts, results, strict=True):
        torch.testing.assert_close(rows, ref_rows[a - PREFIX : b - PREFIX], atol=1e-4, rtol=1e-4)
        assert state.num_tokens == ref_state.num_tokens
        for got, want in zip(state.slot_state + state.entries, ref_state.slot_state + ref_state.entries, strict=True):
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        for g, w in zip(decoded, ref_decoded, strict=True):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
            assert g.argmax() == w.argmax()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_split_chunk_gives_consecutive_non_empty_parts():
    assert split_chunk(300, 700, 2) == [(300, 512), (512, 700)]
    assert split_chunk(0, 4096, 4) == [(0, 1024), (1024, 2048), (2048, 3072), (3072, 4096)]
    assert split_chunk(10, 13, 3) == [(10, 11), (11, 12), (12, 13)]
    for start, end, w in [(0, 1000, 3), (5, 300, 4), (0, 129, 2)]:
        parts = split_chunk(start, end, w)
        assert parts[0][0] == start and parts[-1][1] == end and all(a < b for a, b in parts)
        assert all(p[1] == q[0] for p, q in zip(parts, parts[1:], strict=False))
    with pytest.raises(ValueError, match="cannot be split over 3 ranks"):
        split_chunk(0, 2, 3)
