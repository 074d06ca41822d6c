"""The physical KV pool of DeepSeek-V4's state (docs/architecture.md §5): one set of tensors per layer
shared by every sequence, addressed through slots and page tables.

Per sequence and layer V4 keeps two kinds of state:

- fixed-size state, one *slot* per sequence: the sliding-window ring (the last `window`
  raw KV rows, row of position p at p % window) and the compressors' rings (the last
  `coff * ratio` projected rows and gate scores in fp32, row of position p at p % ring;
  with overlap (ratio 4) the ring holds the previous block too, whose first half the next
  entry pools);
- state that grows with the context, in *pages* of `page_size` raw tokens: a page holds
  page_size/4 compressed entries and indexer keys on CSA layers and page_size/128 entries
  on HCA layers. Entry j of a sequence lives at row page_table[j // epp] * epp + j % epp
  of the layer's entry tensor (epp = entries per page).

A sequence's pages are shared by all layers (each layer has its own tensors, indexed by
the same page ids), so allocation speaks raw tokens. Every method that writes the tensors
runs in inference mode, as the model's forward does (tensors grown there are inference
tensors). Capacity grows by doubling when a worker was not given its size up front; the
engine's `KVCacheManager` decides who may grow, this pool only stores. Snapshots (prefix
cache) share full pages by reference count; exports (KV handoff) copy a sequence out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


class KVPoolError(RuntimeError):
    """The pool was asked for something it cannot do (a page size that does not divide)."""


@dataclass
class SeqState:
    """One sequence's handle into a pool; `num_tokens` is the next token's position."""

    pool: KVPool
    slot: int
    pages: list[int] = field(default_factory=list)
    num_tokens: int = 0

    def free(self) -> None:
        self.pool.release(self)


@dataclass
class Snapshot:
    """A sequence's state at a page boundary, kept for reuse (prefix cache): its full pages
    (shared, reference counted) and a copy of its slot's rings, per layer."""

    num_tokens: int
    pages: list[int]
    slot_state: list[list[torch.Tensor]]


LayerState = tuple[list[torch.Tensor], list[torch.Tensor]]  # one layer's slot tensors and entries


@dataclass
class SeqExport:
    """A sequence's whole state, out of any pool (KV handoff between instances): per layer
    its slot tensors (window and compressor rings) and its compressed entries / indexer keys."""

    num_tokens: int
    slot_state: list[list[torch.Tensor]]
    entries: list[list[torch.Tensor]]  # per layer: [compressor entries, indexer keys] present there
    checksums: list[int] | None = None  # per layer, as shipped (workers/handoff.py `checksum`): the importer verifies

    def nbytes(self) -> int:
        tensors = [t for layer in (*self.slot_state, *self.entries) for t in layer]
        return sum(t.numel() * t.element_size() for t in tensors)

    def fetch(self, timeout: float | None = None) -> SeqExport:
        """The state itself (it is here already; a remote one, `workers.handoff.StateRefs`, is fetched)."""
        return self


@dataclass(frozen=True)
class StepView:
    """The batch's addresses for one forward: slot [B] and page table [B, max pages] tensors
    (padded with page 0, always a valid page, so padded lookups stay in bounds); on a
    decode step (one token per sequence) also, per compress ratio, the rows whose block
    closes with this token [n] -- decided on the host, so the forward never asks the device."""

    slots: torch.Tensor
    page_table: torch.Tensor
    closing: dict[int, torch.Tensor] = field(default_factory=dict)


class CompressorPool:
    """One compressor's tensors for every sequence of a layer."""

    def __init__(
        self, ratio: int, width: int, proj_width: int, dtype: torch.dtype, page_size: int, device: torch.device,
        owns_entries: bool = True,
    ) -> None:  # fmt: skip
        if page_size % ratio:
            raise KVPoolError(f"page_size {page_size} is not a multiple of compress ratio {ratio}")
        self.ratio, self.width, self.dtype = ratio, width, dtype
        self.overlap = ratio == 4
        self.ring = (2 if self.overlap else 1) * ratio
        self.epp = page_size // ratio  # entries per page
        self.owns_entries = owns_entries  # else the layer's `kv_rows` holds them (see LayerPool)
        self.ring_kv = torch.empty(0, self.ring, proj_width, dtype=torch.float32, device=device)
        self.ring_score = torch.empty(0, self.ring, proj_width, dtype=torch.float32, device=device)
        self.entries = torch.empty(0, width, dtype=dtype, device=device)

    def resize(self, slots: int, pages: int) -> None:
        self.ring_kv = _grown(self.ring_kv, slots)
        self.ring_score = _grown(self.ring_score, slots)
        if self.owns_entries:
            self.entries = _grown(self.entries, pages * self.epp)

    def rows(self, page_table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Flat rows of entries `ids` [..., n] given page tables [..., max pages] (same leading dims)."""
        return page_table.gather(-1, ids // self.epp) * self.epp + ids % self.epp

    def write(self, page_table: torch.Tensor, ids: torch.Tensor, entries: torch.Tensor) -> None:
        self.entries[self.rows(page_table, ids).reshape(-1)] = entries.reshape(-1, self.width).to(self.dtype)

    def read(self, page_table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        rows = self.rows(page_table, ids)
        return self.entries.index_select(0, rows.flatten()).view(*rows.shape, self.width)  # 6x entries[rows] on CPU

    def read_span(self, page_table: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Entries start..end-1 (start a multiple of the entries per page) of page tables
        [P] or [B, P] -> [end - start, c] or [B, end - start, c]: whole pages gathered at
        once, not row by row (a decode indexer pass reads every key of every row)."""
        assert start % self.epp == 0, f"a span starts on a page, got entry {start}"
        pages = page_table[..., start // self.epp : -(-end // self.epp)]
        if pages.numel() and page_table.dim() == 1:  # one sequence's chunk (prefill): its pages may be one run
            first = int(pages.reshape(-1)[0])
            if bool((pages.reshape(-1) == torch.arange(first, first + pages.shape[-1], device=pages.device)).all()):
                run = self.entries[first * self.epp : first * self.epp + end - start]  # a view: nothing copied
                return run.view(*pages.shape[:-1], end - start, self.width)
        got = self.entries.view(-1, self.epp, self.width)[pages].flatten(-3, -2)
        return got[..., : end - start, :]


class LayerPool:
    """One attention layer's tensors: the window ring and its compressors' pools.

    The window rings of every slot and the attention compressor's entries share one
    tensor `kv_rows` [slots * ring + entry rows, D] (`window` and `compressor.entries`
    are views of it), so a decode query's keys -- its window rows and its compressed
    entries -- are rows of one tensor that a sparse-attention kernel gathers by index
    (`window_rows`, `entry_rows`)."""

    def __init__(self, attn, dtype: torch.dtype, page_size: int, device: torch.device) -> None:
        self.window_size = attn.window
        self.ring = max(attn.window, 1)
        self.kv_rows = torch.empty(0, attn.head_dim, dtype=dtype, device=device)
        self.window = self.kv_rows.view(0, self.ring, attn.head_dim)
        self.compressor = self.indexer = None
        if attn.compressor is not None:
            c = attn.compressor
            self.compressor = CompressorPool(c.ratio, c.width, c.wkv.weight.shape[0], dtype, page_size, device,
                                             owns_entries=False)  # fmt: skip
        if attn.indexer is not None:
            c = attn.indexer.compressor
            self.indexer = CompressorPool(c.ratio, c.width, c.wkv.weight.shape[0], dtype, page_size, device)

    def resize(self, slots: int, pages: int) -> None:
        old_slots = self.window.shape[0]
        entries = self.compressor.entries if self.compressor is not None else self.kv_rows[:0]
        num_entries = pages * self.compressor.epp if self.compressor is not None else 0
        if slots > old_slots or num_entries > entries.shape[0]:  # zeros: see _grown
            rows = torch.zeros(slots * self.ring + num_entries, self.kv_rows.shape[1], dtype=self.kv_rows.dtype,
                               device=self.kv_rows.device)  # fmt: skip
            rows[: old_slots * self.ring] = self.window.flatten(0, 1)
            rows[slots * self.ring : slots * self.ring + entries.shape[0]] = entries
            self.kv_rows = rows
            self.window = rows[: slots * self.ring].view(slots, self.ring, -1)
            if self.compressor is not None:
                self.compressor.entries = rows[slots * self.ring :]
        for comp in (self.compressor, self.indexer):
            if comp is not None:
                comp.resize(slots, pages)

    def window_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows of `kv_rows` holding each slot's window ring: [B] -> [B, ring]."""
        return slots[:, None] * self.ring + torch.arange(self.ring, device=slots.device)

    def entry_rows(self, page_table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows of `kv_rows` holding compressed entries `ids` [B, n] of page tables [B, P]."""
        return self.window.shape[0] * self.ring + self.compressor.rows(page_table, ids)

    def slot_tensors(self) -> list[torch.Tensor]:
        """The per-slot tensors (window ring, compressor rings), in a fixed order."""
        out = [self.window]
        for comp in (self.compressor, self.indexer):
            if comp is not None:
                out += [comp.ring_kv, comp.ring_score]
        return out


class KVPool:
    """Slots and pages for a list of attention layers (the main model, or one MTP block)."""

    def __init__(
        self, attns: list, dtype: torch.dtype, page_size: int = 128, device: torch.device | str = "cpu"
    ) -> None:
        self.page_size, self.device = page_size, torch.device(device)
        self.layers = [LayerPool(a, dtype, page_size, self.device) for a in attns]
        self._slot_cap = self._page_cap = 0
        self._free_slots: list[int] = []
        self._free_pages: list[int] = []
        self._refs: dict[int, int] = {}  # page -> holders beyond the first (shared prefix pages)
        self.reserve(slots=1, pages=1)  # page 0 exists, so padded page-table lookups stay in bounds

    # -- capacity ---------------------------------------------------------------------
    @torch.inference_mode()
    def reserve(self, slots: int, pages: int) -> None:
        """Make room for at least this many slots and pages (allocating now, not on demand)."""
        slots, pages = max(slots, self._slot_cap), max(pages, self._page_cap)
        if (slots, pages) == (self._slot_cap, self._page_cap):
            return
        for layer in self.layers:
            layer.resize(slots, pages)
        self._free_slots += range(slots - 1, self._slot_cap - 1, -1)
        self._free_pages += range(pages - 1, self._page_cap - 1, -1)
        self._slot_cap, self._page_cap = slots, pages

    @property
    def capacity(self) -> tuple[int, int]:
        """(slots, pages) allocated."""
        return self._slot_cap, self._page_cap

    @property
    def used_pages(self) -> int:
        return self._page_cap - len(self._free_pages)

    @property
    def used_slots(self) -> int:
        return self._slot_cap - len(self._free_slots)

    # -- sequences --------------------------------------------------------------------
    def new_seq(self) -> SeqState:
        if not self._free_slots:
            self.reserve(2 * self._slot_cap, self._page_cap)
        return SeqState(self, self._free_slots.pop())

    def grow(self, st: SeqState, num_tokens: int) -> None:
        """Give `st` the pages for its first `num_tokens` raw tokens."""
        need = math.ceil(num_tokens / self.page_size) - len(st.pages)
        if need > len(self._free_pages):
            self.reserve(self._slot_cap, max(2 * self._page_cap, self.used_pages + need))
        for _ in range(need):
            st.pages.append(self._free_pages.pop())

    def release(self, st: SeqState) -> None:
        """Return the sequence's slot and pages (idempotent); shared pages stay with their other holders."""
        if st.slot < 0:
            return
        self._unref(st.pages)
        self._free_slots.append(st.slot)
        st.pages, st.slot = [], -1

    def _unref(self, pages: list[int]) -> None:
        for page in reversed(pages):
            extra = self._refs.pop(page, 0)
            if extra > 1:
                self._refs[page] = extra - 1
            elif extra == 0:
                self._free_pages.append(page)

    # -- prefix reuse -------------------------------------------------------------------
    @torch.inference_mode()
    def snapshot(self, st: SeqState) -> Snapshot:
        """Keep `st`'s state as it is now; `st.num_tokens` must be a page boundary (its pages are full)."""
        if st.num_tokens % self.page_size or st.slot < 0:
            raise KVPoolError(f"a snapshot needs a live sequence at a page boundary, got {st.num_tokens} tokens")
        pages = st.pages[: st.num_tokens // self.page_size]
        for page in pages:
            self._refs[page] = self._refs.get(page, 0) + 1
        state = [[t[st.slot].clone() for t in layer.slot_tensors()] for layer in self.layers]
        return Snapshot(st.num_tokens, list(pages), state)

    @torch.inference_mode()
    def restore(self, snap: Snapshot) -> SeqState:
        """A new sequence continuing from `snap` (its pages shared, its rings copied into a new slot)."""
        st = self.new_seq()
        for layer, saved in zip(self.layers, snap.slot_state, strict=True):
            for t, value in zip(layer.slot_tensors(), saved, strict=True):
                t[st.slot] = value
        for page in snap.pages:
            self._refs[page] = self._refs.get(page, 0) + 1
        st.pages, st.num_tokens = list(snap.pages), snap.num_tokens
        return st

    @torch.inference_mode()
    def export(self, st: SeqState) -> SeqExport:
        """Copy `st`'s state out (the sequence stays; release it separately)."""
        layers = [self.export_layer(st, i) for i in range(len(self.layers))]
        return SeqExport(st.num_tokens, [s for s, _ in layers], [e for _, e in layers])

    @torch.inference_mode()
    def export_layer(self, st: SeqState, i: int, num_tokens: int | None = None) -> LayerState:
        """Copy layer `i`'s part of `st`'s state out: its slot tensors and its first
        num_tokens // ratio entries per compressor (`num_tokens`: the sequence's tokens once
        the running step ends, when a layer is exported as soon as the step has passed it)."""
        n = st.num_tokens if num_tokens is None else num_tokens
        layer = self.layers[i]
        table = torch.tensor(st.pages or [0], dtype=torch.int64, device=self.device)
        slots = [t[st.slot].clone() for t in layer.slot_tensors()]
        entries = [comp.read(table, torch.arange(n // comp.ratio, device=self.device)) for comp in _comps(layer)]
        return slots, entries

    @torch.inference_mode()
    def import_(self, exp: SeqExport) -> SeqState:
        """A new sequence holding an exported state."""
        st = self.new_seq()
        try:
            self.grow(st, exp.num_tokens)
            table = torch.tensor(st.pages or [0], dtype=torch.int64, device=self.device)
            for layer, saved, rows in zip(self.layers, exp.slot_state, exp.entries, strict=True):
                for t, value in zip(layer.slot_tensors(), saved, strict=True):
                    t[st.slot] = value.to(t.device)
                for comp, value in zip(_comps(layer), rows, strict=True):
                    comp.write(table, torch.arange(value.shape[0], device=self.device), value.to(self.device))
        except BaseException:  # out of memory, a malformed state: nothing stays allocated
            st.free()
            raise
        st.num_tokens = exp.num_tokens
        return st

    def drop(self, snap: Snapshot) -> None:
        """Forget a snapshot: its pages go back to the pool once no sequence shares them."""
        self._unref(snap.pages)
        snap.pages = []

    def view(self, states: list[SeqState], chunk_lens: list[int]) -> StepView:
        """Grow every sequence for its chunk and return the batch's slots and page tables."""
        for st, n in zip(states, chunk_lens, strict=True):
            if st.pool is not self or st.slot < 0:
                raise KVPoolError("sequence state does not belong to this pool (or was released)")
            self.grow(st, st.num_tokens + n)
        width = max((len(st.pages) for st in states), default=0)
        table = [st.pages + [0] * (width - len(st.pages)) for st in states]
        dev = self.device
        table = torch.tensor(table, dtype=torch.int64, device=dev) if width else torch.zeros(
            len(states), 1, dtype=torch.int64, device=dev)  # fmt: skip
        slots = torch.tensor([st.slot for st in states], dtype=torch.int64, device=dev)
        if not states or any(n != 1 for n in chunk_lens):
            return StepView(slots, table)
        ratios = {c.ratio for layer in self.layers for c in _comps(layer)}
        closing = {r: torch.tensor([i for i, st in enumerate(states) if (st.num_tokens + 1) % r == 0],
                                   dtype=torch.int64, device=dev) for r in ratios}  # fmt: skip
        return StepView(slots, table, closing)


def _comps(layer: LayerPool) -> list[CompressorPool]:
    return [c for c in (layer.compressor, layer.indexer) if c is not None]


def _grown(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` with at least `rows` rows along dim 0 (existing rows kept, new ones zero: a batched
    read gathers padding rows and masks them, and a masked 0 * NaN would still be NaN)."""
    if t.shape[0] >= rows:
        return t
    out = torch.zeros(rows, *t.shape[1:], dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out
