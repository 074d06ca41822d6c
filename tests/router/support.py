"""Shared test material: dispatch cases, their checks, the real tiny MoE split over workers,
and a launcher of W gloo processes.

Legend: T tokens on a rank, K experts per token, E routed experts, W workers, d hidden.

Every rank builds every rank's inputs from the case's seed, so each rank can check its own
output against the single-worker reference and its received rows against what the others sent.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from router.comm import Communicator, make_communicator
from router.dispatch import combine, dispatch, moe_reference
from router.gate import route
from router.placement import ExpertPlacement
from workers.moe import MoE
from workers.presets import preset_config


@dataclass(frozen=True)
class Case:
    """One dispatch scenario for all W ranks."""

    name: str
    world_size: int  # W
    tokens: tuple[int, ...]  # T per rank (0 allowed)
    num_experts: int = 8  # E
    top_k: int = 2  # K
    dim: int = 16  # d
    dtype: torch.dtype = torch.float32  # activation dtype on the wire
    expert_pool: tuple[int, ...] | None = None  # experts tokens may pick (None: all) -> skewed, zero splits
    replicas: dict[int, list[int]] = field(default_factory=dict)  # EPLB replicas
    layer: int = 0
    seed: int = 0

    def placement(self) -> ExpertPlacement:
        return ExpertPlacement(self.num_experts, self.world_size, self.replicas)

    def inputs(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per rank: x [T, d] dtype, topk_ids [T, K] int64 (distinct per token), topk_weights [T, K] fp32."""
        g = torch.Generator().manual_seed(self.seed)
        pool = torch.tensor(self.expert_pool if self.expert_pool is not None else range(self.num_experts))
        out = []
        for t in self.tokens:
            x = (torch.randn(t, self.dim, generator=g) + 0.5).to(self.dtype)
            ids = pool[torch.rand(t, len(pool), generator=g).argsort(dim=1)[:, : self.top_k]]
            w = torch.rand(t, self.top_k, generator=g) + 0.1
            out.append((x, ids, w))
        return out

    def expert_mats(self) -> torch.Tensor:
        """[E, d, d]: expert e is the linear map x -> x @ A[e]."""
        g = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn(self.num_experts, self.dim, self.dim, generator=g) / self.dim**0.5


def standard_cases(world_size: int) -> list[Case]:
    """Uneven, zero-split, T = 0, replica and dtype scenarios for W workers."""
    w = world_size
    e = 8
    owned_by_0 = tuple(range(e // w))  # every pair goes to rank 0 (pool of rank 0's experts)
    replicas = {x: [r for r in range(w) if r != x // (e // w)][: 1 + x % 2] for x in range(0, e, 3)} if w > 1 else {}
    return [
        Case("uneven", w, tuple(3 + 4 * r for r in range(w))),
        Case("zero-splits-bf16", w, tuple(0 if r == w - 1 and w > 1 else 5 + r for r in range(w)),
             dtype=torch.bfloat16, expert_pool=owned_by_0 if w > 1 else (1, 2, 5), top_k=min(2, len(owned_by_0))),
        Case("replicas-fp8", w, tuple(0 if r == 0 and w > 1 else 9 + r for r in range(w)),
             dtype=torch.float8_e4m3fn, replicas=replicas, layer=3, top_k=3, seed=7),
        Case("replicas-hot-expert", w, (6,) * w, replicas=replicas, expert_pool=(0, 3, 6), top_k=2, seed=3, layer=1),
        Case("all-empty", w, (0,) * w),
    ]  # fmt: skip


def linear_experts(mats: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """experts_fn(rows [P, d], expert_ids [P]) -> [P, d] fp32 for the linear experts `mats`."""
    return lambda rows, ids: torch.einsum("pd,pde->pe", rows.float(), mats[ids])


def expected_receive(case: Case, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `rank` must receive, by the documented order: by source rank, then (token, k) order.
    -> (rows [R, d], local ids [R], weights [R])."""
    placement = case.placement()
    rows, local, weights = [], [], []
    for src, (x, ids, w) in enumerate(case.inputs()):
        t, k = ids.shape
        tokens = torch.arange(t).repeat_interleave(k)
        dest = placement.pick_owners(ids.reshape(-1), tokens, case.layer, src)
        mine = dest == rank
        rows.append(x[tokens[mine]])
        local.append(placement.local_index[rank, ids.reshape(-1)[mine]])
        weights.append(w.reshape(-1)[mine])
    return torch.cat(rows), torch.cat(local), torch.cat(weights)


def check_case(comm: Communicator, case: Case) -> int:
    """Run dispatch -> linear experts -> combine on comm.rank; assert it matches; return R."""
    rank, placement = comm.rank, case.placement()
    x, ids, w = case.inputs()[rank]
    mats = linear_experts(case.expert_mats())
    recv, handle = dispatch(x, ids, w, placement, comm, layer=case.layer)
    want_rows, want_local, want_weights = expected_receive(case, rank)
    assert recv.dtype == x.dtype and recv.shape == want_rows.shape, case.name
    assert torch.equal(recv.view(torch.uint8), want_rows.view(torch.uint8)), f"{case.name}: rows not bit-exact"
    assert torch.equal(handle.recv_local_ids, want_local) and handle.recv_local_ids.dtype == torch.int64
    assert torch.equal(handle.recv_weights, want_weights) and handle.recv_weights.dtype == torch.float32
    assert handle.send_splits == torch.bincount(
        placement.pick_owners(ids.reshape(-1), torch.arange(ids.shape[0]).repeat_interleave(ids.shape[1]),
                              case.layer, rank), minlength=case.world_size).tolist()  # fmt: skip
    global_ids = torch.tensor(placement.local_experts(rank), dtype=torch.int64)[handle.recv_local_ids]
    out = mats(recv, global_ids) * handle.recv_weights[:, None]
    y = combine(out, handle)
    assert y.dtype == torch.float32 and y.shape == (x.shape[0], case.dim)
    torch.testing.assert_close(y, moe_reference(x, ids, w, mats), msg=lambda m: f"{case.name} rank {rank}: {m}")
    return recv.shape[0]


def run_standard_cases(comm: Communicator) -> None:
    for case in standard_cases(comm.world_size):
        check_case(comm, case)


def full_moe(layer_id: int, seed: int = 0) -> MoE:
    """The tiny preset's MoE layer with random fp32 weights (all experts)."""
    cfg = preset_config("tiny")
    g = torch.Generator().manual_seed(seed)
    moe = MoE(cfg, layer_id, torch.float32)
    for p in moe.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.2)
    if moe.gate.is_hash:
        moe.gate.tid2eid.copy_(torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=g).argsort(1)[:, :2])
    return moe


def worker_moe(full: MoE, layer_id: int, experts: list[int]) -> MoE:
    """A worker's part of `full`: same gate and shared expert, only `experts` (sorted) routed."""
    part = MoE(preset_config("tiny"), layer_id, torch.float32, expert_ids=experts)
    part.gate.load_state_dict(full.gate.state_dict())
    part.shared_experts.load_state_dict(full.shared_experts.state_dict())
    for name in ("w1", "w2", "w3"):
        getattr(part.experts, name).data.copy_(getattr(full.experts, name).data[experts])
    return part


def check_parallel_moe(comm: Communicator, layer_id: int, replicas: dict[int, list[int]], tokens: list[int]) -> None:
    """The routed tiny MoE over W workers (gate -> dispatch -> ExpertGroup -> combine + shared)
    equals the full single-process MoE on this rank's tokens."""
    full = full_moe(layer_id)
    cfg = preset_config("tiny")
    placement = ExpertPlacement(cfg.n_routed_experts, comm.world_size, replicas)
    part = worker_moe(full, layer_id, placement.local_experts(comm.rank))
    g = torch.Generator().manual_seed(100 + comm.rank)
    t = tokens[comm.rank]
    x, input_ids = torch.randn(t, cfg.hidden_size, generator=g), torch.randint(0, cfg.vocab_size, (t,), generator=g)
    weights, ids = route(x, input_ids, part.gate)
    recv, handle = dispatch(x, ids, weights, placement, comm, layer=layer_id)
    out = part.experts(recv, handle.recv_local_ids, handle.recv_weights)
    y = combine(out, handle) + part.shared_experts(x).float()
    torch.testing.assert_close(y, full(x, input_ids).float(), atol=1e-5, rtol=1e-5)


def _gloo_entry(rank: int, world_size: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=30))
    try:
        fn(make_communicator("gloo"), *args)
    finally:
        dist.destroy_process_group()


def spawn_gloo(world_size: int, fn: Callable[..., None], *args: object, timeout: float = 90.0) -> None:
    """Run fn(comm, *args) in W fresh processes joined in one gloo group over a TCPStore hosted
    here on 127.0.0.1 (free port). Raises if any process fails or time runs out; joins them all."""
    # forkserver: fresh processes like spawn, but forked from one server that imported torch
    # once (an import costs seconds on a loaded 2-core machine; four of them per test add up).
    mp.set_forkserver_preload(["torch", "tests.router.support"])
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    ctx = mp.start_processes(_gloo_entry, args=(world_size, store.port, fn, args), nprocs=world_size,
                             join=False, start_method="forkserver")  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=0.2):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gloo workers still running after {timeout}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
            p.join(10)
        del store


def check_raw_all_to_all(comm: Communicator) -> None:
    """The communicator alone: uneven and zero splits, fp32 / bf16 / fp8 rows arrive bit-exact."""
    w, r = comm.world_size, comm.rank
    splits = [[(s * 3 + d * 5) % 4 for d in range(w)] for s in range(w)]  # includes zeros

    def rows(src: int, dst: int, dtype: torch.dtype) -> torch.Tensor:
        n = splits[src][dst]
        return (torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) * 0.25 + 10 * src + dst + 0.5).to(dtype)

    counts = comm.all_to_all_splits(torch.tensor(splits[r]))
    assert counts.tolist() == [splits[s][r] for s in range(w)]
    for dtype in (torch.float32, torch.bfloat16, torch.float8_e4m3fn):
        send = torch.cat([rows(r, d, dtype) for d in range(w)])
        got = comm.all_to_all(send, splits[r], counts.tolist())
        want = torch.cat([rows(s, r, dtype) for s in range(w)])
        assert got.dtype == dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8)), dtype


def run_gloo_suite(comm: Communicator) -> None:
    check_raw_all_to_all(comm)
    run_standard_cases(comm)
