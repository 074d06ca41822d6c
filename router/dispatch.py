"""Dispatch and combine: send each (token, expert) pair to a worker holding the expert, and back.

Legend: T tokens on this worker, K experts per token, P = T * K pairs this worker sends,
R rows this worker receives, W workers, d hidden, E routed experts.

One MoE layer on worker `rank` (every worker calls dispatch and combine, also with T = 0):

    weights, ids = route(x, input_ids, moe.gate)                         # [T, K] fp32, [T, K] int64
    recv, handle = dispatch(x, ids, weights, placement, comm, layer)     # recv [R, d]
    out = moe.experts(recv, handle.recv_local_ids, handle.recv_weights)  # [R, d], weights applied
    y = combine(out, handle) + moe.shared_experts(x).float()             # [T, d] fp32

What the receiver gets, for each received row i (rows grouped by source rank 0..W-1, and
within one source in that source's (token, k) order):
- `recv[i]`: the token's activation, x's dtype, bits unchanged (fp8 too);
- `handle.recv_local_ids[i]` int64: index into `placement.local_experts(rank)`, i.e. the
  local expert id `ExpertGroup` expects when built with those expert ids;
- `handle.recv_weights[i]` fp32: the gate weight of that (token, expert) pair.
The expert side applies the weights, so `combine` is a plain fp32 sum of each token's K
returned rows. Cost: two all-to-alls per dispatch (split sizes, then rows) and one per combine.

With `stats=` (a `router.stats.DispatchStats`), dispatch records the layer's routing, rows,
wire bytes and wall time, and the combine of its handle records its own bytes and time.

Wire format (one all-to-all carries rows and metadata): a uint8 row of
[local id int32 | weight fp32 | activation bytes | padding to a multiple of 8 bytes], so each
field is a zero-copy, aligned view on arrival; `recv` is a strided view into that buffer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from router.comm import Communicator
from router.placement import ExpertPlacement
from router.stats import DispatchStats

_META_BYTES = 8  # int32 local expert id + fp32 gate weight


@dataclass(frozen=True)
class DispatchHandle:
    """What `combine` (and the expert side) needs from one `dispatch`."""

    comm: Communicator  # the communicator combine runs on
    num_tokens: int  # T, rows of combine's output
    send_splits: list[int]  # [W] rows sent to each peer; combine receives exactly these back
    recv_splits: list[int]  # [W] rows received from each peer; combine returns exactly these
    send_token_ids: torch.Tensor  # [P] int64 source token of each sent row, in send order (the permutation)
    recv_local_ids: torch.Tensor  # [R] int64 local expert id of each received row on this rank
    recv_weights: torch.Tensor  # [R] fp32 gate weight of each received row
    layer: int = 0  # the MoE layer, for stats
    stats: DispatchStats | None = None  # where combine records its traffic and time (None: nowhere)


def dispatch(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    placement: ExpertPlacement,
    comm: Communicator,
    layer: int = 0,
    stats: DispatchStats | None = None,
) -> tuple[torch.Tensor, DispatchHandle]:
    """x [T, d] any dtype, topk_ids [T, K] int64 global expert ids, topk_weights [T, K]
    -> (recv [R, d] in x's dtype, handle); see the module docstring for the receiver's view.

    Pair (t, k) goes to `placement.pick_owners` of expert topk_ids[t, k] (replica rule there,
    with this layer and this rank). `stats`: where this layer's dispatch and combine record.
    """
    start = time.perf_counter()
    t, k = topk_ids.shape
    assert x.dim() == 2 and x.shape[0] == t and topk_weights.shape == topk_ids.shape
    assert comm.world_size == placement.num_workers, f"{comm.world_size} workers, placement for {placement}"
    dev = x.device
    experts = topk_ids.reshape(-1).to(dev, torch.int64)  # [P]
    tokens = torch.arange(t, device=dev).repeat_interleave(k)  # [P]
    dest = placement.pick_owners(experts, tokens, layer, comm.rank)  # [P]
    local_ids = placement.local_index.to(dev)[dest, experts]  # [P]
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=comm.world_size)  # [W]
    send_splits = send_counts.tolist()
    recv_splits = comm.all_to_all_splits(send_counts).tolist()
    send_tokens = tokens[order]
    packed = _pack(x[send_tokens], local_ids[order], topk_weights.reshape(-1).to(dev)[order])
    recv, recv_local_ids, recv_weights = _unpack(comm.all_to_all(packed, send_splits, recv_splits), x.dtype, x.shape[1])
    handle = DispatchHandle(comm, t, send_splits, recv_splits, send_tokens, recv_local_ids, recv_weights, layer, stats)
    if stats is not None:
        seconds = time.perf_counter() - start
        stats.record_routing(layer, topk_ids)
        stats.record_dispatch(layer, comm.rank, send_splits, recv_splits, packed.shape[1], seconds)
    return recv, handle


def combine(expert_out: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """expert_out [R, d] (rows of `recv`, weights already applied; any dtype) -> y [T, d] fp32.

    y[t] = sum of the K rows returned for token t's pairs.
    """
    start = time.perf_counter()
    assert expert_out.dim() == 2 and expert_out.shape[0] == sum(handle.recv_splits)
    back = handle.comm.all_to_all(expert_out, handle.recv_splits, handle.send_splits)  # [P, d], send order
    y = torch.zeros(handle.num_tokens, expert_out.shape[1], dtype=torch.float32, device=back.device)
    y.index_add_(0, handle.send_token_ids.to(back.device), back.float())
    if handle.stats is not None:
        row_bytes = expert_out.shape[1] * expert_out.element_size()
        seconds = time.perf_counter() - start
        handle.stats.record_combine(handle.layer, handle.comm.rank, handle.recv_splits, handle.send_splits,
                                    row_bytes, seconds)  # fmt: skip
    return y


def moe_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    experts_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The oracle of combine(experts(dispatch(...))), all on one worker:
    y[t] = sum_k topk_weights[t, k] * experts_fn(x[t], topk_ids[t, k]).

    x [T, d], topk_ids [T, K] global ids, topk_weights [T, K];
    experts_fn(rows [P, d], expert_ids [P] int64 global) -> [P, d] (unweighted) -> y [T, d] fp32.
    """
    t, k = topk_ids.shape
    tokens = torch.arange(t, device=x.device).repeat_interleave(k)
    out = experts_fn(x[tokens], topk_ids.reshape(-1).long()).float() * topk_weights.reshape(-1, 1).float()
    return torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, tokens, out)


def _row_bytes(d: int, dtype: torch.dtype) -> int:
    """Bytes per wire row: metadata, then the activation, padded to a multiple of 8."""
    act = d * torch.empty((), dtype=dtype).element_size()
    return _META_BYTES + -(-act // 8) * 8


def _pack(rows: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """rows [P, d], local_ids [P], weights [P] -> wire rows [P, B] uint8."""
    p, d = rows.shape
    act = d * rows.element_size()
    buf = torch.empty(p, _row_bytes(d, rows.dtype), dtype=torch.uint8, device=rows.device)
    meta = torch.stack([local_ids.to(torch.int32), weights.float().view(torch.int32)], dim=1)  # [P, 2] int32
    buf[:, :_META_BYTES] = meta.view(torch.uint8)
    buf[:, _META_BYTES : _META_BYTES + act] = rows.contiguous().view(torch.uint8)
    return buf


def _unpack(buf: torch.Tensor, dtype: torch.dtype, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """wire rows [R, B] uint8 -> (rows [R, d] dtype (a view), local_ids [R] int64, weights [R] fp32)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    meta = buf[:, :_META_BYTES].view(torch.int32)  # [R, 2]
    rows = buf[:, _META_BYTES : _META_BYTES + d * itemsize].view(dtype)
    return rows, meta[:, 0].long(), meta[:, 1].contiguous().view(torch.float32)
