"""Per-request incremental state of DeepSeek-V4 (DESIGN §5): what one sequence carries
between forward calls so that a full pass, chunked prefill and token-by-token decode
compute the same thing.

Per layer: the sliding-window rows (last `window - 1` raw KV rows), and on compressed
layers the compressor's open block and its compressed entries; on CSA layers the same
for the indexer's compressor (its entries are the indexer keys).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class GrowBuffer:
    """Rows appended over time, stored with doubling capacity (amortised O(1) append)."""

    def __init__(self, width: int, dtype: torch.dtype) -> None:
        self._data = torch.empty(0, width, dtype=dtype)
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def append(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        if n == 0:
            return
        need = self._len + n
        if need > self._data.shape[0]:
            grown = torch.empty(max(need, 2 * self._data.shape[0], 16), self._data.shape[1], dtype=self._data.dtype)
            grown[: self._len] = self._data[: self._len]
            self._data = grown
        self._data[self._len : need] = rows
        self._len = need

    def view(self) -> torch.Tensor:
        return self._data[: self._len]

    def nbytes(self) -> int:
        return self._len * self._data.shape[1] * self._data.element_size()


@dataclass
class CompressorState:
    """One compressor's carry between calls (SPEC §4.3).

    `open_kv`/`open_score` hold the projections of the current, not yet complete block
    ([b, coff*c] fp32, b < ratio; scores already include `ape`). With overlap (ratio 4),
    `prev_kv`/`prev_score` hold the last complete block ([ratio, 2c]) whose first half
    feeds the next entry. `entries` are the emitted compressed rows [N, c].
    """

    width: int  # c: entry width
    proj_width: int  # coff * c
    dtype: torch.dtype
    open_kv: torch.Tensor = field(init=False)
    open_score: torch.Tensor = field(init=False)
    prev_kv: torch.Tensor | None = None
    prev_score: torch.Tensor | None = None
    entries: GrowBuffer = field(init=False)

    def __post_init__(self) -> None:
        self.open_kv = torch.empty(0, self.proj_width, dtype=torch.float32)
        self.open_score = torch.empty(0, self.proj_width, dtype=torch.float32)
        self.entries = GrowBuffer(self.width, self.dtype)


@dataclass
class LayerState:
    """One layer's state for one sequence."""

    window: torch.Tensor  # [<= window - 1, D] latest raw KV rows, oldest first
    compressor: CompressorState | None = None  # ratio 4 and 128 layers
    indexer: CompressorState | None = None  # ratio 4 layers: the indexer keys


@dataclass
class SeqState:
    """All layers' state for one sequence; `num_tokens` is the next token's position."""

    layers: list[LayerState]
    num_tokens: int = 0

    def nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            total += layer.window.numel() * layer.window.element_size()
            for comp in (layer.compressor, layer.indexer):
                if comp is not None:
                    total += comp.entries.nbytes()
        return total
