"""Dispatch statistics (router/stats.py): bytes, rows and tokens per expert against arithmetic
from routing decisions computed here; the snapshot window; the EP and plain MoE layers' counts.

Legend: T tokens on a rank, K experts per token, E routed experts, W workers, d hidden.
"""

from __future__ import annotations

import pytest
import torch

from router.comm import run_local
from router.dispatch import combine, dispatch
from router.placement import ExpertPlacement
from router.stats import DispatchStats, LayerStats, merge
from tests.router.support import Case, full_moe, worker_moe
from workers.ep import EPMoE, count_routing
from workers.presets import preset_config


def destinations(case: Case, src: int) -> torch.Tensor:
    """[T * K] destination rank of each (token, k) pair of rank `src`, by the documented rule
    owner number (t + layer + src) mod n_owners, owners = primary block then replicas."""
    _, ids, _ = case.inputs()[src]
    per = case.num_experts // case.world_size
    out = []
    for t, row in enumerate(ids.tolist()):
        for e in row:
            owners = [e // per, *case.replicas.get(e, [])]
            out.append(owners[(t + case.layer + src) % len(owners)])
    return torch.tensor(out, dtype=torch.int64)


def wire_row_bytes(d: int, dtype: torch.dtype) -> int:
    """Dispatch's wire row: int32 local id + fp32 weight, then the activation padded to 8 bytes."""
    act = d * torch.empty((), dtype=dtype).element_size()
    return 8 + (act + 7) // 8 * 8


def run_case(case: Case, out_dtype: torch.dtype, calls: int = 1) -> list[dict[int, LayerStats]]:
    """dispatch -> (rows cast to out_dtype) -> combine on every rank, `calls` times; each rank's snapshot."""

    def body(comm):
        stats = DispatchStats(case.num_experts)
        x, ids, w = case.inputs()[comm.rank]
        for _ in range(calls):
            recv, handle = dispatch(x, ids, w, case.placement(), comm, layer=case.layer, stats=stats)
            combine(recv.float().to(out_dtype), handle)
        return stats.snapshot()

    return run_local(case.world_size, body)


CASES = [
    Case("uneven-fp32", 2, (3, 7)),
    Case("padded-bf16", 4, (5, 0, 2, 6), dim=5, dtype=torch.bfloat16, top_k=3, layer=2),  # 10 bytes -> 16
    Case("replicas-fp8", 4, (9, 4, 0, 7), dtype=torch.float8_e4m3fn, replicas={0: [3], 5: [0, 1], 7: [1]},
         layer=1, seed=5),  # fmt: skip
    Case("one-worker", 1, (6,), top_k=2),
    Case("all-empty", 3, (0, 0, 0), num_experts=6),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_bytes_rows_and_experts_match_arithmetic(case, out_dtype):
    snaps = run_case(case, out_dtype, calls=2)
    w, k, d = case.world_size, case.top_k, case.dim
    dest = [destinations(case, src) for src in range(w)]
    disp_row, comb_row = wire_row_bytes(d, case.dtype), d * torch.empty((), dtype=out_dtype).element_size()
    for rank, snap in enumerate(snaps):
        assert list(snap) == [case.layer]
        s = snap[case.layer]
        _, ids, _ = case.inputs()[rank]
        sent = 2 * case.tokens[rank] * k
        recv = 2 * sum(int((dd == rank).sum()) for dd in dest)
        to_self = 2 * int((dest[rank] == rank).sum())
        assert (s.num_calls, s.num_tokens, s.rows_sent, s.rows_recv) == (2, 2 * case.tokens[rank], sent, recv)
        assert s.dispatch_bytes_sent == sent * disp_row and s.dispatch_bytes_recv == recv * disp_row
        assert s.combine_bytes_sent == recv * comb_row and s.combine_bytes_recv == sent * comb_row
        assert s.remote_bytes_sent == (sent - to_self) * disp_row + (recv - to_self) * comb_row
        assert s.bytes_sent == s.dispatch_bytes_sent + s.combine_bytes_sent
        want_experts = 2 * torch.bincount(ids.reshape(-1), minlength=case.num_experts)
        assert s.tokens_per_expert.dtype == torch.int64 and torch.equal(s.tokens_per_expert, want_experts)
        assert s.dispatch_s > 0 and s.combine_s > 0 and s.comm_s == s.dispatch_s + s.combine_s
    total = merge(snaps)[case.layer]
    assert total.rows_sent == total.rows_recv == 2 * sum(case.tokens) * k  # every pair arrives once
    assert total.bytes_sent == total.bytes_recv


def test_snapshot_resets_and_starts_a_new_window():
    case = CASES[0]

    def body(comm):
        stats = DispatchStats(case.num_experts)
        x, ids, w = case.inputs()[comm.rank]
        recv, handle = dispatch(x, ids, w, case.placement(), comm, layer=4, stats=stats)
        combine(recv, handle)
        first, empty = stats.snapshot(), stats.snapshot()
        recv, handle = dispatch(x[:1], ids[:1], w[:1], case.placement(), comm, layer=4, stats=stats)
        combine(recv, handle)
        return first, empty, stats.snapshot()

    for rank, (first, empty, second) in enumerate(run_local(2, body)):
        assert empty == {}
        assert first[4].num_tokens == case.tokens[rank] and second[4].num_tokens == 1
        assert second[4].rows_sent == case.top_k and int(second[4].tokens_per_expert.sum()) == case.top_k
        assert first[4].tokens_per_expert is not second[4].tokens_per_expert


def test_no_stats_records_nothing_and_changes_nothing():
    case = CASES[1]

    def body(comm):
        x, ids, w = case.inputs()[comm.rank]
        outs = []
        for stats in (None, DispatchStats(case.num_experts)):
            recv, handle = dispatch(x, ids, w, case.placement(), comm, layer=case.layer, stats=stats)
            assert handle.stats is stats and handle.layer == case.layer
            outs.append(combine(recv.float(), handle))
        return outs

    for plain, counted in run_local(case.world_size, body):
        assert torch.equal(plain, counted)


def test_balancedness_and_merge_by_hand():
    def layer(experts: list[int], secs: float) -> LayerStats:
        return LayerStats(1, 2, 4, 3, 10, 20, 30, 40, 5, secs, 2 * secs, torch.tensor(experts))

    assert layer([2, 2, 2, 2], 0.1).balancedness == 1.0
    assert layer([4, 0, 0, 0], 0.1).balancedness == 0.25
    assert layer([3, 1, 0, 0], 0.1).balancedness == pytest.approx(1 / 3)
    assert layer([0, 0], 0.1).balancedness != layer([0, 0], 0.1).balancedness  # nan: no tokens
    m = merge([{0: layer([4, 0, 0, 0], 0.5), 3: layer([1, 1, 1, 1], 1.0)}, {0: layer([0, 4, 0, 0], 0.25)}])
    assert list(m) == [0, 3] and m[3].tokens_per_expert.tolist() == [1, 1, 1, 1]
    assert (m[0].num_calls, m[0].rows_recv, m[0].dispatch_bytes_recv, m[0].remote_bytes_sent) == (2, 6, 40, 10)
    assert m[0].dispatch_s == 0.75 and m[0].combine_s == 1.5 and m[0].balancedness == 0.5
    assert m[0].tokens_per_expert.tolist() == [4, 4, 0, 0]


def test_out_of_range_expert_and_bad_sizes_raise():
    with pytest.raises(IndexError):
        DispatchStats(4).record_routing(0, torch.tensor([[1, 4]]))
    with pytest.raises(ValueError):
        DispatchStats(0)


@pytest.mark.parametrize("layer_id", [2, 0])  # score-routed, hash-routed
def test_ep_layers_count_the_gates_choices(layer_id):
    """EPMoE over W = 4 records into its stats exactly the bincount of the full gate's experts."""
    cfg = preset_config("tiny")
    full = full_moe(layer_id)
    tokens = [6, 0, 9, 4]
    placement = ExpertPlacement(cfg.n_routed_experts, 4)

    def inputs(rank):
        g = torch.Generator().manual_seed(50 + rank)
        t = tokens[rank]
        return torch.randn(t, cfg.hidden_size, generator=g), torch.randint(0, cfg.vocab_size, (t,), generator=g)

    def body(comm):
        stats = DispatchStats(cfg.n_routed_experts)
        ep = EPMoE(worker_moe(full, layer_id, placement.local_experts(comm.rank)), placement, comm, layer_id, stats)
        ep(*inputs(comm.rank))
        return stats.snapshot()

    snaps = run_local(4, body)
    for rank, snap in enumerate(snaps):
        _, ids = full.gate(*inputs(rank))
        assert torch.equal(snap[layer_id].tokens_per_expert, torch.bincount(ids.reshape(-1), minlength=8))
        assert snap[layer_id].rows_sent == tokens[rank] * cfg.num_experts_per_tok
    # rows received per worker = pairs routed to its two experts, from everyone
    counts = merge(snaps)[layer_id].tokens_per_expert
    assert [snap[layer_id].rows_recv for snap in snaps] == counts.reshape(4, 2).sum(1).tolist()


def test_plain_model_counts_routing(tiny_checkpoint):
    """W = 1: `count_routing` hooks the gates; the counts equal the bincount of each layer's
    gate applied (here, separately) to the MoE input captured by a hook of the test's own."""
    from workers.step import SamplingParams, SeqWork, StepPlan
    from workers.weights import load_model
    from workers.worker import ModelWorker

    model = load_model(tiny_checkpoint, dtype=torch.float32, progress=False)
    stats = count_routing(model)
    assert model.dispatch_stats is stats and count_routing(model) is stats  # not hooked twice
    seen: dict[int, torch.Tensor] = {}

    def capture(layer_id):
        def hook(moe, args, _out):
            _, ids = moe.gate.forward(*args)  # not moe.gate(...): that would run count_routing's hook too
            seen[layer_id] = torch.cat([seen.get(layer_id, ids[:0]), ids])

        return hook

    for blk in model.layers:
        blk.ffn.register_forward_hook(capture(blk.layer_id))
    prompts = {"a": tuple(range(5, 25)), "b": tuple(range(100, 107))}
    greedy = SamplingParams(temperature=0.0)
    ModelWorker(model).execute(StepPlan(work=tuple(SeqWork(u, p, 0, True) for u, p in prompts.items()),
                                        sampling=dict.fromkeys(prompts, greedy)))  # fmt: skip
    snap = stats.snapshot()
    assert list(snap) == [blk.layer_id for blk in model.layers]
    for layer_id, s in snap.items():
        assert s.num_calls == 1 and s.num_tokens == 27 and s.bytes_sent == 0 and s.comm_s == 0
        assert torch.equal(s.tokens_per_expert, torch.bincount(seen[layer_id].reshape(-1), minlength=8))
    assert stats.snapshot() == {}
