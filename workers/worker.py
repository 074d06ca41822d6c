"""The model worker: owns a model and its requests' state, runs one `StepPlan` per call.

Plain class; the in-process backend calls it directly and the Ray backend wraps it
(`ray.remote` lives in one place, cluster/backends/ray_group.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from router.stats import LayerStats
from workers import faults
from workers.ep import count_routing
from workers.handoff import (
    Carrier,
    HandoffFetchError,
    checksum,
    checksum_value,
    discard,
    layer_bytes,
    layout_of,
    signature,
    verify,
)
from workers.kv_pool import KVPool, SeqExport, SeqState, Snapshot
from workers.model import Batch, Transformer, grows_by
from workers.sampler import SamplingBatch, sample
from workers.step import SamplingParams, StepPlan, StepResult, TokenLogprob


class ModelWorker:
    """`lockstep`: run the layers even for an empty plan, because peers wait for this
    worker in the MoE collectives (expert parallelism). `page_size`: raw tokens per page
    of the model's KV pool (the engine's page size, so both count the same pages)."""

    def __init__(self, model: Transformer, lockstep: bool = False, page_size: int | None = None) -> None:
        self.model = model
        if page_size is not None and page_size != model.kv.page_size:
            model.configure_kv(page_size)
        count_routing(model)  # tokens per expert (expert-parallel layers record their traffic too)
        self.lockstep = lockstep
        self.states: dict[str, SeqState] = {}  # uid -> model state
        self.params: dict[str, SamplingParams] = {}  # uid -> sampling params
        self.seeds: dict[str, int] = {}  # uid -> RNG seed
        self.prefixes: dict[str, Snapshot] = {}  # prefix key -> state kept for reuse
        self.carrier = Carrier()  # how handed-off states leave (Ray actors: the object store)
        self.outbox: dict[str, list] = {}  # uid -> layers shipped during its last step, for its handoff
        self.fetch_timeout = 30.0  # seconds a handed-off state may take to arrive

    def execute(self, plan: StepPlan) -> StepResult:
        """Drop finished state, run every chunk of the plan in one flat batch, sample.
        A handed-off state that cannot be fetched or imported fails its request alone
        (`StepResult.failed`); the rest of the plan runs."""
        for uid in plan.finished:
            self.release(uid)
        for key in plan.evict:
            snap = self.prefixes.pop(key, None)
            if snap is not None:
                self.model.kv.drop(snap)
        for uid, params in plan.sampling.items():
            self.params[uid] = params
            self.seeds[uid] = params.seed if params.seed is not None else _fresh_seed()
        failed: dict[str, str] = {}
        work, states = [], []
        deadline = time.monotonic() + self.fetch_timeout  # for every import of this step together
        for w in plan.work:
            st = self.states.get(w.uid)
            if st is None and w.uid in plan.imports:
                try:
                    st = self._import(plan.imports[w.uid], max(0.0, deadline - time.monotonic()))
                except Exception as e:  # noqa: BLE001 - this request fails alone, nothing was allocated
                    failed[w.uid] = f"the handed-off state cannot be imported: {e}"
                    self.release(w.uid)
                    continue
                self.states[w.uid] = st
            elif st is None and w.prefix is not None:
                if w.prefix not in self.prefixes:
                    raise KeyError(f"{w.uid}: cached prefix {w.prefix} is not on this worker")
                st = self.states[w.uid] = self.model.kv.restore(self.prefixes[w.prefix])
            elif st is None:
                st = self.states[w.uid] = self.model.new_state()
            at = w.pos0 if w.chunk is None else w.chunk[0]
            assert st.num_tokens == at, f"{w.uid}: state at {st.num_tokens}, plan at {at}"
            work.append(w)
            states.append(st)
        if not work:
            if self.lockstep:
                self.model(Batch.build([], []), [])
            return StepResult(tokens={}, failed=failed)
        chunks = [torch.tensor(w.token_ids, dtype=torch.int64) for w in work]
        batch = Batch.build(chunks, states, [None if w.chunk is None else (w.pos0, w.chunk) for w in work])
        exporting = [(w.uid, st, st.num_tokens + grows_by(sq, st))
                     for w, st, sq in zip(work, states, batch.seqs, strict=True) if w.uid in plan.exports]  # fmt: skip
        faults.hit("worker.prefill" if any(len(w.token_ids) > 1 for w in work) else "worker.decode")
        streams = self._forward(batch, states, exporting)
        for uid, key in plan.snapshots.items():
            if uid not in failed:  # (the engine forgets a failed one's key)
                self.prefixes[key] = self.model.kv.snapshot(self.states[uid])
        rows = [i for i, w in enumerate(work) if w.sample]
        if not rows:
            return StepResult(tokens={}, failed=failed)
        last = torch.tensor([batch.seqs[i].end - 1 for i in rows], device=streams.device)
        logits = self.model.logits(streams[last])
        uids = [work[i].uid for i in rows]
        result = self._sample(uids, logits, plan.num_generated)
        return StepResult(tokens=result.tokens, logprobs=result.logprobs, failed=failed)

    def _forward(self, batch: Batch, states: list[SeqState], exporting: list[tuple[str, SeqState, int]]):
        """The model's forward; each state in `exporting` (uid, state, its tokens after this
        step) is handed to the carrier layer by layer, as soon as the forward has passed
        the layer (the step is its request's last before the handoff)."""
        if not exporting:
            return self.model(batch, states)
        for uid, _, _ in exporting:
            self.outbox[uid] = []

        def after_layer(i: int) -> None:
            for uid, st, n in exporting:
                piece = self.model.kv.export_layer(st, i, n)
                self.outbox[uid].append(self._shipped(piece))

        self.model.after_layer = after_layer
        try:
            return self.model(batch, states)
        finally:
            self.model.after_layer = None

    def _shipped(self, piece: tuple) -> tuple:
        """A layer handed to the carrier: (what it shipped, slot and entry signatures, bytes,
        its checksum, still on the device)."""
        return (self.carrier.ship(piece), signature(piece[0]), signature(piece[1]), layer_bytes(piece),
                checksum(piece))  # fmt: skip

    def _import(self, ticket: Any, timeout: float) -> SeqState:
        """A handed-off state, fetched through its carrier and checked, in this worker's pool."""
        faults.hit("worker.import")
        problem = self.check_import(ticket)
        if problem is not None:  # before the pool allocates anything for it
            discard(ticket)
            raise ValueError(problem)
        try:
            state = self.carrier.fetch(ticket, timeout)
        except HandoffFetchError as e:
            discard(ticket)  # (a holder still keeping it frees it now)
            raise ValueError(str(e)) from e
        problem = self.check_import(state) or verify(state, getattr(ticket, "checksums", None))
        if problem is not None:  # layers that do not match the ticket's layout or checksums
            raise ValueError(problem)
        return self.model.kv.import_(state)

    def _sample(self, uids: list[str], logits: torch.Tensor, counters: dict[str, int]) -> StepResult:
        rows = []
        for uid in uids:
            p = self.params[uid]
            rows.append((p.temperature, p.top_p, p.top_k, p.min_p, self.seeds[uid], counters.get(uid, 0), p.logprobs))
        sb = SamplingBatch.build(rows, logits.device)
        tokens, chosen, top = sample(logits, sb)
        out_tokens = dict(zip(uids, tokens.tolist(), strict=True))
        logprobs: dict[str, TokenLogprob] = {}
        if chosen is not None:
            ids, vals = top[0].tolist(), top[1].tolist()
            for i, uid in enumerate(uids):
                n = self.params[uid].logprobs
                if n > 0:
                    alts = tuple(zip(ids[i][:n], vals[i][:n], strict=True))
                    logprobs[uid] = TokenLogprob(out_tokens[uid], float(chosen[i]), alts)
        return StepResult(tokens=out_tokens, logprobs=logprobs)

    def export(self, uid: str, timeout: float | None = None) -> Any:
        """Hand a request's state over (KV handoff out) and drop it here: the carrier's
        ticket (`workers/handoff.py`), from the layers shipped during its last step when
        that step was marked to export it, else shipped now. `timeout` bounds remote
        exports (Ray); one in this process needs none."""
        faults.hit("worker.export")
        st = self.states[uid]
        shipped = self.outbox.pop(uid, None)
        if shipped is None or len(shipped) != len(self.model.kv.layers):
            shipped = [self._shipped(self.model.kv.export_layer(st, i)) for i in range(len(self.model.kv.layers))]
        checksums = [checksum_value(s[4], s[1], s[2]) for s in shipped]
        ticket = self.carrier.ticket(st.num_tokens, [s[0] for s in shipped], [(s[1], s[2]) for s in shipped],
                                     sum(s[3] for s in shipped), checksums)  # fmt: skip
        self.release(uid)
        return ticket

    def state_spec(self) -> StateSpec:
        """What a handed-off state must look like to be imported here."""
        return StateSpec.of(self.model.kv)

    def check_import(self, state: Any) -> str | None:
        """Why `state` cannot be imported here (None: it can)."""
        return self.state_spec().problem(state)

    def release(self, uid: str) -> None:
        self.outbox.pop(uid, None)
        st = self.states.pop(uid, None)
        if st is not None:
            st.free()
        self.params.pop(uid, None)
        self.seeds.pop(uid, None)

    def num_states(self) -> int:
        return len(self.states)

    def routing_window(self) -> dict[int, LayerStats]:
        """Per-layer routing and all-to-all stats since the previous call."""
        return self.model.dispatch_stats.snapshot()


@dataclass(frozen=True)
class StateSpec:
    """The shape of an exported state (`SeqExport`) that a KV pool can import: per layer,
    each per-slot tensor's (shape without the slot dim, dtype) and each compressor's
    (ratio, width, dtype); a state of n tokens carries [n // ratio, width] entries per
    compressor. Checked before anything is allocated, so a malformed handoff (another
    model or dtype on the other side, a truncated object) fails alone and leaks nothing."""

    slots: tuple[tuple[tuple[tuple[int, ...], torch.dtype], ...], ...]
    entries: tuple[tuple[tuple[int, int, torch.dtype], ...], ...]

    @classmethod
    def of(cls, pool: KVPool) -> StateSpec:
        slots = tuple(tuple((tuple(t.shape[1:]), t.dtype) for t in layer.slot_tensors()) for layer in pool.layers)
        entries = tuple(tuple((c.ratio, c.width, c.dtype) for c in (layer.compressor, layer.indexer) if c is not None)
                        for layer in pool.layers)  # fmt: skip
        return cls(slots, entries)

    def problem(self, state: Any) -> str | None:
        """Why the ticket `state` does not fit this spec (None: it fits)."""
        n = getattr(state, "num_tokens", None)
        layout = layout_of(state)
        if layout is None:
            return f"expected an exported state, got {type(state).__name__}"
        if not isinstance(n, int) or n < 0:
            return f"num_tokens must be an integer >= 0, got {n!r}"
        if isinstance(state, SeqExport) and len(state.slot_state) != len(state.entries):
            return f"layers of slot state and of entries: {[len(state.slot_state), len(state.entries)]}, " \
                   f"expected {len(self.slots)}"
        if len(layout) != len(self.slots):
            return f"{len(layout)} layers of state, expected {len(self.slots)} layers"
        for i, (got_slots, got_rows) in enumerate(layout):
            want_slots = list(self.slots[i])
            want_rows = [((n // ratio, width), dtype) for ratio, width, dtype in self.entries[i]]
            if list(got_slots) != want_slots or list(got_rows) != want_rows:
                return f"layer {i}: tensors {got_slots} + {got_rows}, expected {want_slots} + {want_rows}"
        return None


def _fresh_seed() -> int:
    return int(torch.randint(0, 2**62, (1,)).item())
