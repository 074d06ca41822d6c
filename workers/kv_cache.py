"""KV cache accounting for DeepSeek-V4's state (docs/architecture.md §5), in raw-token pages.

Per request and layer V4 keeps: the sliding-window rows (fixed: `window` rows), the
compressors' open blocks (fixed), compressed entries (one per 4 tokens on CSA layers,
one per 128 on HCA layers) and, on CSA layers, the indexer keys (one per 4 tokens).
A page covers `page_size` raw tokens, so it holds page_size/4 CSA entries and
page_size/128 HCA entries per layer; the fixed part of a request is charged as
`pages_per_seq` extra pages. Allocation, admission and freeing all speak tokens.

The tensors themselves live in the workers' `KVPool`s (workers/kv_pool.py), paged with
the same page size; this manager decides who may grow and enforces the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from workers.config import ModelConfig


@dataclass(frozen=True)
class KVLayout:
    """The arithmetic of V4's cache for one model (and cache element size)."""

    bytes_per_token: float  # compressed entries + indexer keys, all layers, per raw token
    bytes_per_seq: int  # window rows + compressor open blocks, all layers, per request

    @classmethod
    def for_model(cls, cfg: ModelConfig, elem_bytes: int = 2, include_mtp: bool = False) -> KVLayout:
        per_token, per_seq = 0.0, 0
        n_layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
        d, ci = cfg.head_dim, cfg.index_head_dim
        for layer in range(n_layers):
            r = cfg.compress_ratio(layer)
            per_seq += cfg.sliding_window * d * elem_bytes  # window ring
            if r == 0:
                continue
            coff = 2 if r == 4 else 1
            per_token += d * elem_bytes / r  # compressed entries
            per_seq += 2 * (coff * r) * (coff * d) * 4  # open block: kv + score, fp32
            if r == 4:
                per_token += ci * elem_bytes / 4  # indexer keys
                per_seq += 2 * (2 * 4) * (2 * ci) * 4  # indexer compressor open block
        return cls(per_token, per_seq)

    def bytes_for(self, num_tokens: int) -> float:
        return self.bytes_per_seq + self.bytes_per_token * num_tokens


class KVCacheManager:
    """Pages of `page_size` raw tokens; each request holds ceil(tokens / page_size) pages
    plus `pages_per_seq` for its fixed state."""

    def __init__(self, layout: KVLayout, num_pages: int, page_size: int = 128) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"KV cache needs num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}")
        self.layout, self.num_pages, self.page_size = layout, num_pages, page_size
        self.page_bytes = max(layout.bytes_per_token * page_size, 1.0)
        self.pages_per_seq = math.ceil(layout.bytes_per_seq / self.page_bytes)
        self._held: dict[str, int] = {}  # uid -> pages
        self._copies: dict[str, int] = {}  # uid -> copies of its state held (context-parallel replicas), if not 1
        self._used = 0

    @classmethod
    def from_bytes(cls, layout: KVLayout, cache_bytes: int, page_size: int = 128) -> KVCacheManager:
        pages = int(cache_bytes // max(layout.bytes_per_token * page_size, 1.0))
        return cls(layout, max(pages, 1), page_size)

    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size) + self.pages_per_seq

    @property
    def used_pages(self) -> int:
        return self._used

    @property
    def free_pages(self) -> int:
        return self.num_pages - self._used

    def held(self, uid: str) -> int:
        return self._held.get(uid, 0)

    def fits_ever(self, num_tokens: int) -> bool:
        """Could a request of this many tokens fit in an empty cache?"""
        return self.pages_for(num_tokens) <= self.num_pages

    def can_grow(self, uid: str, num_tokens: int) -> bool:
        return self.pages_for(num_tokens) * self._copies.get(uid, 1) - self.held(uid) <= self.free_pages

    def set_copies(self, uid: str, copies: int) -> None:
        """`uid`'s state is held `copies` times (every rank's replica during a context-parallel
        prefill): its pages count that many times. Lowering it gives the extra pages back."""
        old = self._copies.pop(uid, 1)
        if copies != 1:
            self._copies[uid] = copies
        if uid in self._held:
            held = self._held[uid] // old * copies
            self._used += held - self._held[uid]
            self._held[uid] = held

    def grow(self, uid: str, num_tokens: int) -> bool:
        """Make `uid` hold enough pages for `num_tokens`; False (nothing changed) if full."""
        extra = self.pages_for(num_tokens) * self._copies.get(uid, 1) - self.held(uid)
        if extra <= 0:
            return True
        if extra > self.free_pages:
            return False
        self._held[uid] = self.held(uid) + extra
        self._used += extra
        return True

    def free(self, uid: str) -> None:
        self._used -= self._held.pop(uid, 0)
        self._copies.pop(uid, None)

    def holders(self) -> list[str]:
        return list(self._held)
