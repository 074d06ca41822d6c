"""Communicators: the one collective the router needs, an all-to-all with split sizes, by name.

Legend: W workers (world size), N rows sent, M rows received, `...` any trailing row shape.

- `local`: W workers inside one process, one thread per worker, meeting in a `LocalGroup`
  (an in-memory exchange behind a barrier). Each thread runs the same SPMD code as a
  distributed worker; `run_local(W, fn)` runs `fn(comm)` on W threads and joins them all.
- `gloo`, `nccl`: torch.distributed `all_to_all_single` with split sizes over a process group
  the caller has initialised (`init_process_group(backend, store=...)`). One class, one code
  path; only the backend name and the device differ (CPU for gloo, the current GPU for nccl).

Every rank calls every collective, also with nothing to send (N = 0). Rows of any 1-byte
dtype (float8 kinds, bool) travel as a uint8 view, since gloo has no fp8; bf16 and the other
dtypes travel as they are. A received tensor is always a fresh buffer, never a peer's memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar, runtime_checkable

import torch
import torch.distributed as dist

from router.names import COMMUNICATORS

R = TypeVar("R")


@runtime_checkable
class Communicator(Protocol):
    """One worker's end of an all-to-all group."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        """send [N, ...], its rows in blocks of send_splits[p] rows for peer p = 0..W-1 -> [M, ...],
        the blocks the peers sent me, recv_splits[p] rows from peer p, in rank order.

        sum(send_splits) = N, sum(recv_splits) = M; any split may be 0; same dtype out as in.
        """
        ...

    def all_to_all_splits(self, counts: torch.Tensor) -> torch.Tensor:
        """counts [W] int64, rows I will send to each peer -> [W] int64, rows each peer will send to me."""
        ...


class CollectiveTimeoutError(RuntimeError):
    """A local collective gave up: a peer did not arrive in time, or a peer failed and aborted the group."""


def _to_wire(t: torch.Tensor) -> torch.Tensor:
    """The tensor as it travels: 1-byte dtypes as a uint8 view, others unchanged; contiguous."""
    t = t.contiguous()
    return t.view(torch.uint8) if t.element_size() == 1 and t.dtype not in (torch.uint8, torch.int8) else t


class LocalGroup:
    """The meeting point of W in-process workers (one thread each).

    `exchange` is the all-to-all: each rank posts its W outgoing parts, all wait, each takes
    part [rank] from every poster, all wait again so no part is replaced before it is read.
    """

    def __init__(self, world_size: int, timeout: float = 60.0) -> None:
        if world_size <= 0:
            raise ValueError(f"world_size={world_size} must be positive")
        self.world_size = world_size
        self.timeout = timeout
        self._barrier = threading.Barrier(world_size, timeout=timeout)
        self._posted: list[list[torch.Tensor]] = [[] for _ in range(world_size)]  # src rank -> parts by dst

    def communicator(self, rank: int) -> LocalCommunicator:
        return LocalCommunicator(self, rank)

    def abort(self) -> None:
        """Release every waiting rank with CollectiveTimeoutError (a peer failed)."""
        self._barrier.abort()

    def exchange(self, rank: int, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """parts[dst] from this rank -> the part each src posted for this rank, by src."""
        assert len(parts) == self.world_size
        self._posted[rank] = parts
        self._wait(rank)
        got = [self._posted[src][rank] for src in range(self.world_size)]
        self._wait(rank)
        return got

    def _wait(self, rank: int) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise CollectiveTimeoutError(
                f"local collective on rank {rank}: peers did not all arrive within {self.timeout}s, or one failed"
            ) from None


class LocalCommunicator:
    """Rank `rank` of a `LocalGroup`; call its collectives from that rank's own thread."""

    def __init__(self, group: LocalGroup, rank: int) -> None:
        if not 0 <= rank < group.world_size:
            raise ValueError(f"rank {rank} out of range 0..{group.world_size - 1}")
        self.group = group
        self.rank = rank
        self.world_size = group.world_size

    def all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        assert len(send_splits) == len(recv_splits) == self.world_size and sum(send_splits) == send.shape[0]
        got = self.group.exchange(self.rank, list(_to_wire(send).split(send_splits)))
        assert [g.shape[0] for g in got] == list(recv_splits), f"rank {self.rank}: recv_splits {recv_splits} disagree"
        return torch.cat(got).view(send.dtype)

    def all_to_all_splits(self, counts: torch.Tensor) -> torch.Tensor:
        assert counts.shape == (self.world_size,)
        return torch.cat(self.group.exchange(self.rank, list(counts.to(torch.int64).split(1))))


class DistCommunicator:
    """torch.distributed all-to-all over an initialised process group (`gloo` or `nccl`)."""

    def __init__(self, backend: str, group: dist.ProcessGroup | None = None, device: torch.device | None = None):
        if not dist.is_initialized():
            raise ValueError(f"communicator {backend!r} needs torch.distributed.init_process_group first")
        actual = str(dist.get_backend(group))
        if backend not in actual:
            raise ValueError(f"communicator {backend!r} over a process group with backend {actual!r}")
        self.backend = backend
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.device = device

    def all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        assert len(send_splits) == len(recv_splits) == self.world_size and sum(send_splits) == send.shape[0]
        wire = _to_wire(send.to(self.device))
        out = wire.new_empty((sum(recv_splits), *wire.shape[1:]))
        dist.all_to_all_single(out, wire, list(recv_splits), list(send_splits), group=self.group)
        return out.view(send.dtype)

    def all_to_all_splits(self, counts: torch.Tensor) -> torch.Tensor:
        assert counts.shape == (self.world_size,)
        send = counts.to(self.device, torch.int64).contiguous()
        out = torch.empty_like(send)
        dist.all_to_all_single(out, send, group=self.group)
        return out


def make_communicator(
    name: str,
    *,
    group: LocalGroup | dist.ProcessGroup | None = None,
    rank: int | None = None,
    device: torch.device | None = None,
) -> Communicator:
    """A communicator by name.

    - `local`: `group` is the shared `LocalGroup`, `rank` this thread's rank.
    - `gloo` / `nccl`: `group` a torch.distributed process group (None: the default one, which
      must be initialised with that backend); rank and world size come from it. `device`
      defaults to CPU for gloo and the current CUDA device for nccl.
    """
    if name == "local":
        if not isinstance(group, LocalGroup) or rank is None:
            raise ValueError("communicator 'local' needs group=LocalGroup(...) and rank=")
        return group.communicator(rank)
    if name in ("gloo", "nccl"):
        if isinstance(group, LocalGroup):
            raise ValueError(f"communicator {name!r} needs a torch.distributed process group, not a LocalGroup")
        return DistCommunicator(name, group, device)
    raise ValueError(f"unknown communicator {name!r}; known communicators: {', '.join(COMMUNICATORS)}")


def run_local(
    world_size: int, fn: Callable[[Communicator], R], timeout: float = 60.0, run_timeout: float | None = None
) -> list[R]:
    """Run `fn(comm)` for ranks 0..W-1 on W threads over one `LocalGroup`; results by rank.

    `timeout` bounds each collective's wait for its peers; `run_timeout` (None: unbounded)
    bounds the whole run. If a rank raises, the group is aborted (the others stop at their
    next collective) and the first root-cause error is re-raised once every thread has ended.
    """
    group = LocalGroup(world_size, timeout)
    results: list[R | None] = [None] * world_size
    errors: list[BaseException | None] = [None] * world_size

    def body(rank: int) -> None:
        try:
            results[rank] = fn(group.communicator(rank))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors[rank] = exc
            group.abort()

    threads = [threading.Thread(target=body, args=(r,), name=f"local-rank-{r}", daemon=True) for r in range(world_size)]
    for th in threads:
        th.start()
    deadline = None if run_timeout is None else time.monotonic() + run_timeout
    for th in threads:
        th.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    if any(th.is_alive() for th in threads):
        group.abort()  # ranks waiting in a collective leave now; one busy elsewhere leaves at its next one
        for th in threads:
            th.join(timeout)
        raise CollectiveTimeoutError(f"run_local: a rank was still running after {run_timeout}s")
    failed = [e for e in errors if e is not None]
    if failed:
        raise next((e for e in failed if not isinstance(e, CollectiveTimeoutError)), failed[0])
    return results  # type: ignore[return-value]
