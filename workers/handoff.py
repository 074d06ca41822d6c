"""How a prefilled request's state leaves its worker and reaches a decode worker (KV
handoff, docs/architecture.md §2), behind one interface: a `Carrier`.

A prefill-only request's last prompt chunk is marked in its step's plan
(`StepPlan.exports`); its worker hands each layer's part of the state (`LayerState`: the
slot rings and the layer's entries) to the carrier as soon as the forward has passed
that layer, so the copy out of the pool (and, for a carrier that sends, the transfer)
runs while the later layers compute. What the engine then passes from the prefill
instance to the decode instance is the carrier's ticket, and the decode worker fetches
the layers from it just before it imports them into its pool:

- `Carrier` (the reference, in one process): the ticket is the state itself (`SeqExport`).
- `ObjectStoreCarrier` (Ray actors; in cluster/backends/ray_handoff.py, as Ray is
  imported only under cluster/): each layer is put in the Ray object store by the
  prefill actor; the ticket (`StateRefs`) holds the object refs and the state's layout,
  a few hundred bytes, so the driver never holds the state, and the decode actor pulls
  the layers from the store itself. The prefill actor owns the objects: if it dies before
  the decode actor fetched them, the fetch fails (`HandoffFetchError`) and the request
  alone fails there (the engine's handoff failure policy applies).
- `CollectiveCarrier` (GPU workers): the layers stay on the prefill worker's device (a
  copy out of its pool) and the decode worker pulls them with torch.distributed send/recv
  over a two-rank group between the two workers (nccl for CUDA tensors, gloo for CPU
  ones), opened on first use and kept per pair. The ticket (`PulledState`) names the
  holder (`Endpoint`: a Ray actor, cluster/backends/ray_handoff.py, or a thread in this
  process) and a key. (Ray's own direct transport was weighed: in Ray 2.60 it cannot
  pass refs nested in a plan, `ray.put` does not take gloo/nccl, and an actor joins one
  collective group per backend.)

Every ticket has `num_tokens`, per layer the checksum of what was shipped (`checksum`:
computed on the prefill worker as each layer leaves its pool, verified by the decode
worker on what it fetched, before anything is imported: a state corrupted or cut short
on the way fails its request, which the engine's handoff failure policy recomputes or
fails, instead of decoding garbage), its layout (`layout_of`: per layer, the (shape, dtype) of
each tensor, checked before the decode side allocates anything), `nbytes()` and
`fetch(timeout)`; `discard(ticket)` lets go of one that will not be fetched (a request
refused or ended before its import: its `discard()`, where it has one), so its holder
frees it at once.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import torch

from workers.kv_pool import LayerState, SeqExport

Signature = list[tuple[tuple[int, ...], torch.dtype] | None]
Layout = list[tuple[Signature, Signature]]  # per layer: (slot tensors, entries)


class HandoffFetchError(RuntimeError):
    """A handed-off state could not be fetched (its prefill worker died, or it took too long)."""


def signature(tensors: Any) -> Signature:
    """(shape, dtype) of each tensor of a list; None for what is not a tensor."""
    if not isinstance(tensors, list | tuple):
        return [None]
    return [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else None for t in tensors]


def layer_bytes(piece: LayerState) -> int:
    return sum(t.numel() * t.element_size() for part in piece for t in part)


_CHUNK = 1 << 22  # bytes per checksum op (bounds the int64 temporaries)
_MOD = 65521  # Fletcher/Adler's prime: position weights stay small, sums never overflow int64


def checksum(piece: LayerState) -> torch.Tensor:
    """A Fletcher-style checksum of one layer's tensors: (sum of bytes, position-weighted
    sum of bytes) as an int64 pair on the tensors' device, the same on any device. Left
    on the device (no host sync inside the forward); `checksum_value` reads it."""
    tensors = [t for part in piece for t in part]
    device = tensors[0].device if tensors else torch.device("cpu")
    total = torch.zeros(2, dtype=torch.int64, device=device)
    offset = 0
    for t in tensors:
        data = t.detach().contiguous().reshape(-1).view(torch.uint8)
        for start in range(0, data.numel(), _CHUNK):
            b = data[start : start + _CHUNK].to(torch.int64)
            w = torch.arange(offset + start, offset + start + b.numel(), device=device, dtype=torch.int64) % _MOD + 1
            total += torch.stack([b.sum(), (b * w).sum()])
        offset += data.numel() + 1  # (a byte moved across a tensor boundary changes the weights)
    return total


def checksum_value(total: torch.Tensor, slots: Signature, entries: Signature) -> int:
    """One int from a `checksum` pair, with the layer's shapes and dtypes (its signatures)
    folded in (crc32 of their text: the same in every process)."""
    s1, s2 = (int(v) for v in total.tolist())
    return (s2 << 32 | s1 & 0xFFFFFFFF) ^ zlib.crc32(repr((slots, entries)).encode())


def verify(state: SeqExport, checksums: list[int] | None) -> str | None:
    """Why a fetched state is not what was shipped (None: every layer's checksum matches)."""
    layers = list(zip(state.slot_state, state.entries, strict=False))
    if checksums is None:
        return "the handed-off state carries no checksums"
    if len(checksums) != len(layers):
        return f"the handed-off state has {len(layers)} layers, its checksums {len(checksums)}"
    for i, (piece, expected) in enumerate(zip(layers, checksums, strict=True)):
        if checksum_value(checksum(piece), signature(piece[0]), signature(piece[1])) != expected:
            return f"layer {i} of the handed-off state does not match its checksum (corrupted on the way)"
    return None


def discard(ticket: Any) -> None:
    """Let go of a ticket that will not be fetched (best effort, never raises, never waits)."""
    drop = getattr(ticket, "discard", None)
    if drop is not None:
        try:
            drop()  # not waited for
        except Exception:  # noqa: BLE001 - a dead holder has dropped it already
            pass


def layout_of(state: Any) -> Layout | None:
    """A ticket's layout, or None when `state` is not a ticket with well-formed layers."""
    if not isinstance(state, SeqExport):  # a ticket of a carrier that sends: it knows its layout
        layout = getattr(state, "layout", None)
        return layout if isinstance(layout, list) else None
    if not isinstance(state.slot_state, list | tuple) or not isinstance(state.entries, list | tuple):
        return None
    n = max(len(state.slot_state), len(state.entries))  # a layer missing from one list shows as [None]
    slots, entries = [*state.slot_state, *[None] * n][:n], [*state.entries, *[None] * n][:n]
    return [(signature(s), signature(e)) for s, e in zip(slots, entries, strict=True)]


class Carrier:
    """The reference carrier, for workers in one process: layers stay as they are and the
    ticket is the `SeqExport` itself."""

    name = "local"

    def ship(self, piece: LayerState) -> Any:
        """Called as soon as a layer's part of an exported state is final."""
        return piece

    def ticket(self, num_tokens: int, shipped: list[Any], layout: Layout, nbytes: int, checksums: list[int]) -> Any:
        """What the engine passes on, once every layer was shipped."""
        return SeqExport(num_tokens, [s for s, _ in shipped], [e for _, e in shipped], checksums)

    def fetch(self, ticket: Any, timeout: float) -> SeqExport:
        """The decode side: the state a ticket stands for, here (`HandoffFetchError` if it cannot come)."""
        return ticket.fetch(timeout)


class Reply(Protocol):
    """The answer to an endpoint call: `done()` without waiting, `result(timeout)` waits
    (and raises what the call raised)."""

    def done(self) -> bool: ...

    def result(self, timeout: float | None = None) -> Any: ...


class Endpoint(Protocol):
    """How a decode worker reaches the worker holding a `PulledState`: `call(name, *args)`
    runs `CollectiveCarrier.<name>(*args)` there, beside its steps (not after them)."""

    id: str

    def call(self, name: str, *args: Any) -> Reply: ...


class LocalEndpoint:
    """A carrier in this process, served on a thread of its own."""

    def __init__(self, carrier: CollectiveCarrier) -> None:
        self.carrier, self.id = carrier, f"local-{uuid.uuid4().hex}"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kv-handoff")

    def call(self, name: str, *args: Any) -> Reply:
        return self._pool.submit(getattr(self.carrier, name), *args)


@dataclass
class PulledState:
    """A handed-off state still held by its prefill worker, to be pulled from it."""

    num_tokens: int
    layout: Layout
    bytes: int
    source: Endpoint
    key: str
    checksums: list[int] | None = None

    def nbytes(self) -> int:
        return self.bytes

    def discard(self) -> None:
        self.source.call("drop", self.key)

    def fetch(self, timeout: float | None = None) -> SeqExport:
        raise HandoffFetchError("a state held by its prefill worker is pulled by a collective carrier; "
                                "this worker has none (both pools need handoff transport `collective`)")  # fmt: skip


class CollectiveCarrier(Carrier):
    """Layers wait on the prefill worker until the decode worker pulls them over a
    two-rank process group (the prefill side is rank 0). A state not pulled within
    `hold_s` (its decode side failed, or it waited that long for room there: the failure
    policy then recomputes it) is dropped at the next ticket; a discarded one at once."""

    name = "collective"

    def __init__(self, device: torch.device, host: str = "127.0.0.1", timeout_s: float = 30.0,
                 hold_s: float = 300.0) -> None:  # fmt: skip
        self.device, self.host, self.timeout_s, self.hold_s = torch.device(device), host, timeout_s, hold_s
        self.endpoint: Endpoint | None = None  # how decode workers reach this one (set by its owner)
        self.held: dict[str, tuple[list[LayerState], float]] = {}  # key -> (layers, deadline)
        self.groups: dict[str, Any] = {}  # channel name -> two-rank group (either side)
        self.peers: dict[str, str] = {}  # holder's endpoint id -> channel name (pulling side)
        self._stores: dict[str, Any] = {}  # channel name -> rendezvous store hosted here (pulling side)
        self._stream: Any = None  # CUDA: the side stream of the channel's sends and receives
        self._lock = threading.Lock()

    def ticket(self, num_tokens: int, shipped: list[Any], layout: Layout, nbytes: int,
               checksums: list[int]) -> PulledState:  # fmt: skip
        if self.endpoint is None:
            raise RuntimeError("a collective carrier needs an endpoint before it hands a state off")
        key, now = uuid.uuid4().hex, time.monotonic()
        with self._lock:
            for old in [k for k, (_, deadline) in self.held.items() if deadline < now]:
                del self.held[old]
            self.held[key] = (shipped, now + self.hold_s)
        return PulledState(num_tokens, layout, nbytes, self.endpoint, key, checksums)

    # -- the holding side (called through its endpoint) -----------------------------------
    def has(self, key: str) -> bool:
        with self._lock:
            return key in self.held

    def drop(self, key: str) -> None:
        with self._lock:
            self.held.pop(key, None)

    def open_channel(self, name: str, addr: tuple[str, int]) -> None:
        import torch.distributed as dist

        store = dist.TCPStore(addr[0], addr[1], is_master=False, timeout=timedelta(seconds=self.timeout_s))
        self.groups[name] = _pair_group(store, name, 0, self.device, self.timeout_s)

    def close_channel(self, name: str) -> None:
        _abort(self.groups.pop(name, None))

    def send(self, key: str, name: str) -> None:
        """A header (1 and the state's bytes, or 0: not held), then each layer as one message
        (its tensors' bytes back to back, each padded to 16). A send that does not complete
        in time closes the channel (the puller gave up)."""
        group = self.groups[name]
        with self._lock:
            held = self.held.pop(key, None)
        layers = [] if held is None else [_pack(piece) for piece in held[0]]
        header = torch.tensor([int(held is not None), sum(m.numel() for m in layers)], device=self.device)
        deadline = time.monotonic() + self.timeout_s
        try:
            for message in (header, *layers):
                with self._side_stream():
                    work = group.send([message], 1, 0)
                _complete(work, deadline, self.device.type == "cuda")
        except Exception:
            self.close_channel(name)
            raise

    # -- the pulling side ------------------------------------------------------------------
    def fetch(self, ticket: Any, timeout: float) -> SeqExport:
        if not isinstance(ticket, PulledState):
            return ticket.fetch(timeout)
        source, deadline = ticket.source, time.monotonic() + timeout
        try:
            if not source.call("has", ticket.key).result(timeout):  # also: a dead holder fails here, at once
                raise HandoffFetchError("its prefill worker no longer holds the state (released or expired)")
            name = self._channel(source, deadline)
            group = self.groups[name]
            sent = source.call("send", ticket.key, name)
            header = self._recv(group, torch.empty(2, dtype=torch.int64, device=self.device), deadline, sent)
            if not int(header[0]):
                raise HandoffFetchError("its prefill worker no longer holds the state (released or expired)")
            sigs = [(*slot_sig, *entry_sig) for slot_sig, entry_sig in ticket.layout]
            sizes = [_padded_sizes(sig) for sig in sigs]
            if int(header[1]) != sum(sum(sz) for sz in sizes):  # (its layers are on the way: close the channel)
                raise ValueError(f"the state has {int(header[1])} bytes, its ticket says otherwise")
            layers = []
            for (slot_sig, _), sig, sz in zip(ticket.layout, sigs, sizes, strict=True):
                flat = self._recv(group, torch.empty(sum(sz), dtype=torch.uint8, device=self.device), deadline, sent)
                tensors = _unpack(flat, sig, sz)
                layers.append((tensors[: len(slot_sig)], tensors[len(slot_sig) :]))
            sent.result(max(0.0, deadline - time.monotonic()))
        except HandoffFetchError:
            raise
        except Exception as e:  # the holder died or hung: this channel is unusable, the state is lost
            self._close(source)
            why = f"{type(e).__name__}: {e}"
            raise HandoffFetchError(f"pulling the state from its prefill worker failed ({why})") from e
        return SeqExport(ticket.num_tokens, [s for s, _ in layers], [e for _, e in layers])

    def _recv(self, group: Any, buf: torch.Tensor, deadline: float, sent: Reply) -> torch.Tensor:
        with self._side_stream():
            work = group.recv([buf], 0, 0)
        _complete(work, deadline, self.device.type == "cuda", sent)
        return buf

    def _channel(self, source: Endpoint, deadline: float) -> str:
        """The channel to `source`, opened (both ends meet through a store hosted here) if new."""
        import torch.distributed as dist

        if source.id in self.peers:
            return self.peers[source.id]
        name = f"kv-handoff-{uuid.uuid4().hex}"
        store = dist.TCPStore(self.host, 0, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=self.timeout_s))  # fmt: skip
        self.peers[source.id], self._stores[name] = name, store  # from here on `_close` undoes it
        opened = source.call("open_channel", name, (self.host, store.port))
        self.groups[name] = _pair_group(store, name, 1, self.device, self.timeout_s)
        opened.result(max(0.0, deadline - time.monotonic()))
        return name

    def _close(self, source: Endpoint) -> None:
        """Forget the channel to `source` after a failure (both ends: its next pull opens a new one)."""
        name = self.peers.pop(source.id, None)
        if name is None:
            return
        _abort(self.groups.pop(name, None))
        self._stores.pop(name, None)
        try:
            source.call("close_channel", name)  # not waited for: the holder may be dead
        except Exception:  # noqa: BLE001
            pass

    def _side_stream(self):
        """NCCL work on a stream of its own, so a pending send or recv never holds up the
        stream the model computes on (gloo: nothing to do)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self._stream)


def _padded_sizes(sig: Signature) -> list[int]:
    """Bytes of each tensor, rounded up to 16 (so every part of a message is aligned for its dtype)."""
    return [-(-math.prod(shape) * dtype.itemsize // 16) * 16 for shape, dtype in sig]


def _pack(piece: LayerState) -> torch.Tensor:
    tensors = [*piece[0], *piece[1]]
    parts = []
    for t, size in zip(tensors, _padded_sizes(signature(tensors)), strict=True):
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        parts += [raw, raw.new_zeros(size - raw.numel())]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def _unpack(flat: torch.Tensor, sig: Signature, sizes: list[int]) -> list[torch.Tensor]:
    out = []
    for part, (shape, dtype) in zip(flat.split(sizes), sig, strict=True):
        out.append(part[: math.prod(shape) * dtype.itemsize].view(dtype).view(shape))
    return out


def _complete(work: Any, deadline: float, cuda: bool, peer: Reply | None = None) -> None:
    """Wait for a send/recv until `deadline`. NCCL: poll, so no CUDA stream is held up, and
    stop early when the peer's call ended with an error. Gloo: one blocking wait (its
    timeout closes the pair, so it cannot be polled in slices; a dead peer closes it at once)."""
    if not cuda:
        work.wait(timedelta(seconds=max(0.001, deadline - time.monotonic())))
        return
    while not work.is_completed():
        if peer is not None and peer.done():
            peer.result(0)  # raises what the holder raised
            peer = None  # it returned: its last send is on the wire
        if time.monotonic() > deadline:
            raise TimeoutError("the transfer did not complete in time")
        time.sleep(0.0005)
    work.wait()  # done: orders the current stream after it


def _abort(group: Any) -> None:
    if group is not None:
        try:
            group.abort()
        except Exception:  # noqa: BLE001 - gone already
            pass


def _pair_group(store: Any, name: str, rank: int, device: torch.device, timeout_s: float) -> Any:
    """A two-rank process group of its own (not the default group): nccl on CUDA, gloo on CPU."""
    import torch.distributed as dist

    prefixed = dist.PrefixStore(f"{name}/", store)
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, 2, opts)
    return dist.ProcessGroupGloo(prefixed, rank, 2, timeout)
