"""Per-layer all-to-all statistics of one worker, over a window of steps.

Legend: E routed experts, W workers, K experts per token, P = T * K (token, expert) pairs.

`dispatch(..., stats=s)` and the `combine` of its handle write into `s`, a `DispatchStats`
(one per worker, shared by that worker's MoE layers); a plain, unsplit MoE can feed only its
routing through `record_routing` (see `workers.ep.count_routing`). Per MoE layer it adds up:

- routing: calls, tokens, and the (token, expert) pairs this worker's gate sent to each
  expert, `tokens_per_expert` [E] (balancedness = mean / max over experts);
- traffic: rows and wire bytes sent and received by dispatch (packed rows: metadata +
  activation, see `router.dispatch`) and by combine (expert outputs in their dtype), and the
  part of the sent bytes that went to other ranks (what crosses the interconnect);
- time: host wall time inside dispatch and inside combine. It includes waiting for the
  slowest peer at each collective; on GPU it is a lower bound (kernels run asynchronously;
  dispatch syncs once, to read the split sizes, combine not at all).

`snapshot()` returns the totals since the previous snapshot and starts a new window.
Recording is a few integer additions and one bincount per layer call, no per-token Python;
a lock makes a snapshot from another thread safe while the worker's own thread records.
The split-size exchange (W int64 per dispatch) is not counted in the bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True, eq=False)  # eq over a tensor field would be ambiguous
class LayerStats:
    """One MoE layer's totals over a window, on one worker (or summed over workers by `merge`)."""

    num_calls: int  # dispatches (or gate calls) recorded: steps that ran this layer
    num_tokens: int  # tokens routed by this worker's gate
    rows_sent: int  # (token, expert) rows dispatched, to itself included (num_tokens * K)
    rows_recv: int  # rows received for this worker's experts
    dispatch_bytes_sent: int  # wire bytes of the dispatched rows
    dispatch_bytes_recv: int
    combine_bytes_sent: int  # bytes of the expert outputs returned
    combine_bytes_recv: int
    remote_bytes_sent: int  # dispatch + combine bytes sent to other ranks
    dispatch_s: float  # wall seconds inside dispatch
    combine_s: float  # wall seconds inside combine
    tokens_per_expert: torch.Tensor  # [E] int64 (token, expert) pairs routed to each expert (CPU)

    @property
    def bytes_sent(self) -> int:
        return self.dispatch_bytes_sent + self.combine_bytes_sent

    @property
    def bytes_recv(self) -> int:
        return self.dispatch_bytes_recv + self.combine_bytes_recv

    @property
    def comm_s(self) -> float:
        """Seconds in dispatch + combine."""
        return self.dispatch_s + self.combine_s

    @property
    def balancedness(self) -> float:
        """mean / max of tokens_per_expert: 1 = even load, 1/E = one expert takes all; nan with no tokens."""
        top = int(self.tokens_per_expert.max()) if self.tokens_per_expert.numel() else 0
        return float(self.tokens_per_expert.double().mean()) / top if top else float("nan")


class _Totals:
    """The mutable running sums behind one layer's `LayerStats`."""

    def __init__(self, num_experts: int) -> None:
        self.ints = dict.fromkeys(
            ("num_calls", "num_tokens", "rows_sent", "rows_recv", "dispatch_bytes_sent", "dispatch_bytes_recv",
             "combine_bytes_sent", "combine_bytes_recv", "remote_bytes_sent"), 0)  # fmt: skip
        self.secs = {"dispatch_s": 0.0, "combine_s": 0.0}
        self.num_experts = num_experts
        self.experts: torch.Tensor | None = None  # [E] int64 on the routing device, made on first use

    def freeze(self) -> LayerStats:
        experts = self.experts if self.experts is not None else torch.zeros(self.num_experts, dtype=torch.int64)
        return LayerStats(**self.ints, **self.secs, tokens_per_expert=experts.cpu())


class DispatchStats:
    """One worker's per-layer totals; see the module docstring. `num_experts` is E."""

    def __init__(self, num_experts: int) -> None:
        if num_experts <= 0:
            raise ValueError(f"num_experts={num_experts} must be positive")
        self.num_experts = num_experts
        self._lock = threading.Lock()
        self._layers: dict[int, _Totals] = {}  # layer id -> running sums

    def _layer(self, layer: int) -> _Totals:
        tot = self._layers.get(layer)
        if tot is None:
            tot = self._layers[layer] = _Totals(self.num_experts)
        return tot

    def record_routing(self, layer: int, topk_ids: torch.Tensor) -> None:
        """One gate call: topk_ids [T, K] global expert ids."""
        assert topk_ids.dim() == 2, f"topk_ids {tuple(topk_ids.shape)}, want [T, K]"
        ids = topk_ids.reshape(-1).long()
        # index_add_, not bincount: bincount sizes its output from the data, a device sync on GPU
        with self._lock:
            tot = self._layer(layer)
            tot.ints["num_calls"] += 1
            tot.ints["num_tokens"] += topk_ids.shape[0]
            if tot.experts is None:
                tot.experts = torch.zeros(self.num_experts, dtype=torch.int64, device=ids.device)
            ids = ids.to(tot.experts.device)
            tot.experts.index_add_(0, ids, torch.ones_like(ids))

    def record_dispatch(
        self, layer: int, rank: int, send_splits: list[int], recv_splits: list[int], row_bytes: int, seconds: float
    ) -> None:
        """One dispatch on `rank`: rows sent to / received from each peer, bytes per wire row."""
        self._record_transfer(layer, "dispatch", rank, send_splits, recv_splits, row_bytes, seconds)

    def record_combine(
        self, layer: int, rank: int, send_splits: list[int], recv_splits: list[int], row_bytes: int, seconds: float
    ) -> None:
        """One combine on `rank`: its send splits are the dispatch's receive splits, and back."""
        self._record_transfer(layer, "combine", rank, send_splits, recv_splits, row_bytes, seconds)

    def _record_transfer(
        self, layer: int, phase: str, rank: int, send: list[int], recv: list[int], row_bytes: int, seconds: float
    ) -> None:
        sent = sum(send)
        with self._lock:
            tot = self._layer(layer)
            if phase == "dispatch":
                tot.ints["rows_sent"] += sent
                tot.ints["rows_recv"] += sum(recv)
            tot.ints[f"{phase}_bytes_sent"] += sent * row_bytes
            tot.ints[f"{phase}_bytes_recv"] += sum(recv) * row_bytes
            tot.ints["remote_bytes_sent"] += (sent - send[rank]) * row_bytes
            tot.secs[f"{phase}_s"] += seconds

    def snapshot(self) -> dict[int, LayerStats]:
        """Layer id -> totals since the last snapshot (layers that recorded nothing are absent); resets."""
        with self._lock:
            layers, self._layers = self._layers, {}
        return {layer: tot.freeze() for layer, tot in sorted(layers.items())}


def merge(snapshots: Iterable[Mapping[int, LayerStats]]) -> dict[int, LayerStats]:
    """Sum several workers' snapshots layer by layer (times become worker-seconds)."""
    out: dict[int, LayerStats] = {}
    for snap in snapshots:
        for layer, s in snap.items():
            prev = out.get(layer)
            out[layer] = s if prev is None else _sum(prev, s)
    return dict(sorted(out.items()))


def _sum(a: LayerStats, b: LayerStats) -> LayerStats:
    return LayerStats(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in fields(LayerStats)})
