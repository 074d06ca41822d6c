"""The KV handoff between Ray actors (workers/handoff.py defines the interface; Ray is
imported only under cluster/, so its carriers live here).

- `ObjectStoreCarrier`: each layer of a handed-off state is `ray.put` by the prefill
  actor; the ticket (`StateRefs`) holds the refs and the layout, so the driver passes a
  few hundred bytes on and the decode actor pulls the layers from the store.
- `RayEndpoint`: how a decode actor reaches the prefill actor that holds a
  `PulledState` for the `CollectiveCarrier` (its `handoff_*` methods, served in their
  own concurrency group beside the steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
import torch

from workers.handoff import Carrier, CollectiveCarrier, HandoffFetchError, Layout
from workers.kv_pool import LayerState, SeqExport

TRANSPORTS = ("object_store", "collective")


def carrier_for(transport: str, device: torch.device, actor: Any) -> Carrier:
    """The carrier of a Ray rank: `collective` (pulled over a group of two: nccl between
    GPUs, gloo on CPU; `actor` is the rank's own handle) or `object_store`."""
    if transport == "collective":
        carrier = CollectiveCarrier(device, host=ray.util.get_node_ip_address())
        carrier.endpoint = RayEndpoint(actor)
        return carrier
    if transport == "object_store":
        return ObjectStoreCarrier()
    raise ValueError(f"handoff transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")


class ObjectStoreCarrier(Carrier):
    """Each layer goes to the Ray object store from the worker that computed it. (CUDA
    tensors are pickled through the host: between GPU workers use `CollectiveCarrier`.)"""

    name = "object_store"

    def ship(self, piece: LayerState) -> Any:
        return ray.put(piece)

    def ticket(self, num_tokens: int, shipped: list[Any], layout: Layout, nbytes: int,
               checksums: list[int]) -> StateRefs:  # fmt: skip
        return StateRefs(num_tokens, layout, shipped, nbytes, checksums)


@dataclass
class StateRefs:
    """A handed-off state left in the Ray object store: one object per layer."""

    num_tokens: int
    layout: Layout
    refs: list[Any]  # ray.ObjectRef per layer, owned by the prefill actor that put them
    bytes: int
    checksums: list[int] | None = None

    def nbytes(self) -> int:
        return self.bytes

    def fetch(self, timeout: float | None = None) -> SeqExport:
        """Pull every layer (in parallel) from the object store."""
        try:
            layers = ray.get(list(self.refs), timeout=timeout)
        except ray.exceptions.GetTimeoutError as e:
            raise HandoffFetchError(f"fetching the state took more than {timeout:g}s") from e
        except ray.exceptions.RayError as e:  # the owner (the prefill actor) died: the objects are gone
            raise HandoffFetchError(f"the state's objects are lost ({type(e).__name__})") from e
        return SeqExport(self.num_tokens, [s for s, _ in layers], [e for _, e in layers])


class RayEndpoint:
    """A `workers.handoff.Endpoint` for a RankWorker actor: calls its `handoff_*` methods."""

    def __init__(self, actor) -> None:
        self.actor, self.id = actor, actor._actor_id.hex()

    def call(self, name: str, *args) -> _RayReply:
        return _RayReply(getattr(self.actor, f"handoff_{name}").remote(*args))


class _RayReply:
    """A `workers.handoff.Reply` over an object ref."""

    def __init__(self, ref) -> None:
        self.ref = ref

    def done(self) -> bool:
        return bool(ray.wait([self.ref], timeout=0)[0])

    def result(self, timeout: float | None = None):
        return ray.get(self.ref, timeout=timeout)
