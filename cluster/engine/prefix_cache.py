"""The engine's index of reusable prefixes (docs/architecture.md §5: prefix reuse speaks raw tokens).

A prefix is a request's state at a page boundary: its full KV pages (compressed entries
and indexer keys, shared by reference) and a copy of its window and compressor rings,
kept by the worker under a key. The key of the first k pages of a token sequence is a
chain hash over those pages, so a new request finds the longest cached prefix of its
prompt page by page. The index lives in the engine (which plans the steps); the worker
keeps the tensors and is told what to keep (`StepPlan.snapshots`) and what to drop
(`StepPlan.evict`).

Each prefix is charged to the KV budget as its pages plus one request's fixed state, and
the least recently used prefixes are evicted when requests need the room.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from workers.kv_cache import KVCacheManager


def page_keys(more: list[int] | tuple[int, ...], page_size: int, keys: list[str] | None = None) -> list[str]:
    """Extend `keys` (chain keys of a sequence's first len(keys) pages; key k covers its
    first (k + 1) * page_size tokens) with the full pages of `more`, the tokens that follow
    those pages."""
    keys = list(keys or [])
    prev = keys[-1] if keys else ""
    for k in range(len(more) // page_size):
        page = array("q", more[k * page_size : (k + 1) * page_size]).tobytes()
        prev = hashlib.blake2b(prev.encode() + page, digest_size=16).hexdigest()
        keys.append(prev)
    return keys


class PrefixIndex:
    """Key -> prefix length in tokens, in least-recently-used order; charged to `kv`."""

    def __init__(self, kv: KVCacheManager) -> None:
        self.kv, self.page_size = kv, kv.page_size
        self._entries: OrderedDict[str, int] = OrderedDict()
        self.pending_evict: list[str] = []  # keys the worker must drop in the next plan
        self.pinned: set[str] = set()  # keys used by the plan being built: never evicted from it
        self.hits = self.lookups = self.evictions = 0

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def cached_pages(self) -> int:
        return sum(self.kv.held(_holder(k)) for k in self._entries)

    def lookup(self, keys: list[str], num_tokens: int) -> tuple[str, int] | None:
        """The longest cached prefix among `keys` (a request's page keys) that leaves at
        least one of its `num_tokens` tokens to run (the last token's logits are needed)."""
        self.lookups += 1
        for k in range(min(len(keys), (num_tokens - 1) // self.page_size) - 1, -1, -1):
            if keys[k] in self._entries:
                self._entries.move_to_end(keys[k])
                self.pinned.add(keys[k])
                self.hits += 1
                return keys[k], (k + 1) * self.page_size
        return None

    def add(self, key: str, num_tokens: int) -> bool:
        """Charge a new prefix of `num_tokens`; evicts older ones if needed, False if it cannot fit."""
        holder = _holder(key)
        while not self.kv.can_grow(holder, num_tokens) and self.evict_one():
            pass
        if not self.kv.grow(holder, num_tokens):
            return False
        self._entries[key] = num_tokens
        self.pinned.add(key)
        return True

    def evict_one(self) -> bool:
        """Drop the least recently used prefix not pinned by the current plan; False if none."""
        for key in self._entries:
            if key not in self.pinned:
                self.remove(key)
                return True
        return False

    def remove(self, key: str) -> None:
        if self._entries.pop(key, None) is not None:
            self.evictions += 1
            self.kv.free(_holder(key))
            self.pending_evict.append(key)

    def reset(self) -> None:
        """Forget every prefix without asking the worker (its state is gone: instance rebuilt)."""
        for key in self._entries:
            self.kv.free(_holder(key))
        self._entries.clear()
        self.pending_evict, self.pinned = [], set()

    def take_plan_changes(self) -> tuple[str, ...]:
        """The evictions for the plan being sealed; unpins its keys."""
        out, self.pending_evict = tuple(self.pending_evict), []
        self.pinned.clear()
        return out


def _holder(key: str) -> str:
    return f"prefix:{key}"
