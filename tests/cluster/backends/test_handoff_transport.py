"""How a KV handoff's state travels (workers/handoff.py, issue #6): shipped layer by layer
while the prefill step computes, fetched by the decode worker through its ticket.

Oracles: the state `KVPool.export` copies out of an identical worker after the same plan
(equal tensor for tensor), a single worker's export for a context-parallel prefill (CP
sums in another order: the tolerance of tests/workers/test_cp.py), a twin decode worker
running the same plan without the lost import, and a colocated engine's tokens for a
disaggregated run over Ray actors (the ticket then holds object refs, not the state).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from cluster.backends.local import LocalWorkerGroup
from cluster.backends.ray_handoff import StateRefs
from cluster.engine.engine import Engine, EngineConfig
from cluster.engine.pool_router import DisaggRouter
from cluster.engine.requests import GenerateRequest
from encoding.tokenizer import load_tokenizer
from tests.cluster.engine.test_disagg import model_of
from tests.cluster.engine.test_engine import prompts, run
from workers.handoff import Carrier, HandoffFetchError, layout_of
from workers.kv_cache import KVCacheManager, KVLayout
from workers.kv_pool import SeqExport
from workers.step import SamplingParams, SeqWork, StepPlan
from workers.worker import ModelWorker

PROMPT = prompts(1, length=300, seed=71)[0]  # 2 full pages of 128 and 44 tokens into the third
CUT = 200  # first chunk [0, 200), exported last chunk [200, 300)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


class RecordingCarrier(Carrier):
    """The reference carrier, noting each layer it is handed (in `events`, shared with hooks)."""

    def __init__(self, events: list) -> None:
        self.events = events
        self.num_shipped = 0

    def ship(self, piece):
        self.events.append(("ship", self.num_shipped))
        self.num_shipped += 1
        return super().ship(piece)


def two_chunks(uid: str, prompt=PROMPT, cut: int = CUT, context_parallel: bool = False) -> list[StepPlan]:
    """A prompt prefilled in two steps; the second samples its first token and is exported."""
    first = SeqWork(uid, prompt[:cut], 0, sample=False, context_parallel=context_parallel)
    last = SeqWork(uid, prompt[cut:], cut, sample=True, context_parallel=context_parallel)
    return [StepPlan(work=(first,), sampling={uid: GREEDY}),
            StepPlan(work=(last,), exports=frozenset({uid}))]  # fmt: skip


def assert_states_equal(got: SeqExport, want: SeqExport, tol: float = 0.0) -> None:
    assert got.num_tokens == want.num_tokens
    assert layout_of(got) == layout_of(want)
    for g_layer, w_layer in zip(got.slot_state + got.entries, want.slot_state + want.entries, strict=True):
        for g, w in zip(g_layer, w_layer, strict=True):
            if tol:
                torch.testing.assert_close(g, w, atol=tol, rtol=tol)
            else:
                assert torch.equal(g, w)


# -- 1. layer by layer, during the forward ---------------------------------------------------


def test_the_last_chunk_ships_each_layer_as_soon_as_it_is_computed(tiny_checkpoint):
    """Layer i leaves before layer i+1 runs; the ticket is exactly the state an identical
    worker holds after the same steps; a request running beside it is not shipped."""
    other = prompts(1, length=40, seed=72)[0]
    events: list = []
    worker, twin = ModelWorker(model_of(tiny_checkpoint)), ModelWorker(model_of(tiny_checkpoint))
    worker.carrier = RecordingCarrier(events)
    for i, blk in enumerate(worker.model.layers):
        blk.register_forward_pre_hook(lambda _m, _a, i=i: events.append(("run", i)))
    num_layers = len(worker.model.layers)
    plans = two_chunks("x")
    plans[0] = StepPlan(work=(*plans[0].work, SeqWork("y", other, 0, sample=True)),
                        sampling={"x": GREEDY, "y": GREEDY})  # fmt: skip
    first = [w.execute(plans[0]) for w in (worker, twin)]
    assert worker.carrier.num_shipped == 0 and not worker.outbox  # nothing exported in a plain step
    decode_y = SeqWork("y", (first[0].tokens["y"],), len(other), sample=True)
    plans[1] = StepPlan(work=(*plans[1].work, decode_y), num_generated={"y": 1}, exports=plans[1].exports)
    events.clear()
    got = worker.execute(plans[1])
    want = twin.execute(StepPlan(work=plans[1].work, num_generated={"y": 1}))  # no exports
    assert first[0].tokens == first[1].tokens and got.tokens == want.tokens and not got.failed
    assert events == [e for i in range(num_layers) for e in (("run", i), ("ship", i))]
    assert list(worker.outbox) == ["x"]
    oracle = twin.model.kv.export(twin.states["x"])
    assert oracle.num_tokens == len(PROMPT)
    pages = worker.model.kv.used_pages
    ticket = worker.export("x")
    assert worker.carrier.num_shipped == num_layers  # the export took the layers shipped during the step
    assert isinstance(ticket, SeqExport)
    assert_states_equal(ticket, oracle)
    assert ticket.nbytes() == oracle.nbytes() > 0
    assert worker.num_states() == 1 and "x" not in worker.states and not worker.outbox
    assert worker.model.kv.used_pages == pages - 3  # x's 3 pages are back; y keeps its own


def test_a_state_exported_without_a_marked_step_is_shipped_at_export(tiny_checkpoint):
    """No `exports` in the plan (the engine's fallback): the export ships every layer then,
    and the ticket is the same state."""
    events: list = []
    worker = ModelWorker(model_of(tiny_checkpoint))
    worker.carrier = RecordingCarrier(events)
    for plan in two_chunks("x"):
        worker.execute(StepPlan(work=plan.work, sampling=plan.sampling))
    assert not events
    oracle = worker.model.kv.export(worker.states["x"])
    ticket = worker.export("x")
    assert events == [("ship", i) for i in range(len(worker.model.layers))]
    assert_states_equal(ticket, oracle)
    assert worker.model.kv.used_pages == 0


# -- 2. context parallel ----------------------------------------------------------------------


def test_a_context_parallel_last_chunk_exports_a_single_workers_state(tiny_checkpoint):
    """Both chunks split over 2 ranks; the owner ships the layers during the last one and
    the other rank ships nothing. The ticket is the state one worker builds (CP sums in
    another order: test_cp's tolerance), its first token the same, no replica left."""
    group = LocalWorkerGroup.load(tiny_checkpoint, 2, dtype=torch.float32, simulate_quant=False)
    single = ModelWorker(model_of(tiny_checkpoint))
    recorders = []
    for w in group.workers:
        w.carrier = RecordingCarrier([])
        recorders.append(w.carrier)
    got = [group.execute(p) for p in two_chunks("x", context_parallel=True)]
    want = [single.execute(replace(p, exports=frozenset())) for p in two_chunks("x")]
    assert group.cp.chunks == 2 and "x" in group.cp.replicated
    assert got[1].tokens == want[1].tokens and set(got[1].tokens) == {"x"}
    owner = group.owner["x"]
    assert [r.num_shipped for r in recorders] == [4 if rank == owner else 0 for rank in range(2)]
    assert group.num_states() == 2  # the owner's state and the other rank's replica
    oracle = single.model.kv.export(single.states["x"])
    ticket = group.export("x")
    assert [r.num_shipped for r in recorders] == [4 if rank == owner else 0 for rank in range(2)]
    assert_states_equal(ticket, oracle, tol=1e-4)
    assert group.num_states() == 0 and not group.cp.replicated and not group.owner
    assert all(w.model.kv.used_pages == 0 for w in group.workers)


# -- 3. a fetch that fails ----------------------------------------------------------------------


class LostRefs(StateRefs):
    """A well-formed ticket whose objects are gone (their owner died)."""

    fetches = 0

    def fetch(self, timeout: float | None = None) -> SeqExport:
        LostRefs.fetches += 1
        raise HandoffFetchError("the state's objects are lost (OwnerDiedError)")


def test_a_ticket_that_cannot_be_fetched_fails_its_request_alone(tiny_checkpoint):
    """A decode step imports a good state, a lost one and decodes a running request: only the
    lost uid fails, nothing is reserved for it, and the others get the tokens of a twin
    worker running the same plan without it."""
    prefill = ModelWorker(model_of(tiny_checkpoint))
    good_prompt, bad_prompt, run_prompt = prompts(3, length=150, seed=73)
    tickets, firsts = {}, {}
    for uid, prompt in (("good", good_prompt), ("bad", bad_prompt)):
        res = prefill.execute(StepPlan(work=(SeqWork(uid, prompt, 0, sample=True),), sampling={uid: GREEDY},
                                       exports=frozenset({uid})))  # fmt: skip
        firsts[uid], tickets[uid] = res.tokens[uid], prefill.export(uid)
    bad = LostRefs(tickets["bad"].num_tokens, layout_of(tickets["bad"]), [], tickets["bad"].nbytes())
    assert prefill.check_import(bad) is None  # it passes every check before the fetch
    decode, twin = ModelWorker(model_of(tiny_checkpoint)), ModelWorker(model_of(tiny_checkpoint))
    start = StepPlan(work=(SeqWork("run", run_prompt, 0, sample=True),), sampling={"run": GREEDY})
    started = [w.execute(start).tokens["run"] for w in (decode, twin)]
    assert started[0] == started[1]
    states, pages = decode.num_states(), decode.model.kv.used_pages

    def step(with_bad: bool) -> StepPlan:
        uids = ["run", "good", *(["bad"] if with_bad else [])]
        prompt = {"run": run_prompt, "good": good_prompt, "bad": bad_prompt}
        first = {"run": started[0], **firsts}
        return StepPlan(work=tuple(SeqWork(u, (first[u],), len(prompt[u]), sample=True) for u in uids),
                        sampling={u: GREEDY for u in uids if u != "run"}, num_generated={u: 1 for u in uids},
                        imports={"good": tickets["good"], **({"bad": bad} if with_bad else {})})  # fmt: skip

    got, want = decode.execute(step(True)), twin.execute(step(False))
    assert LostRefs.fetches == 1
    assert set(got.failed) == {"bad"} and "objects are lost" in got.failed["bad"]
    assert got.tokens == want.tokens and set(got.tokens) == {"run", "good"}
    assert "bad" not in decode.states and "bad" not in decode.params and "bad" not in decode.seeds
    assert decode.num_states() == states + 1 == twin.num_states()
    assert decode.model.kv.used_pages == pages + 2 == twin.model.kv.used_pages  # good's 2 pages only
    assert decode.model.kv.used_slots == twin.model.kv.used_slots
    assert decode.model.kv.capacity == twin.model.kv.capacity


def spy_imports(decode_engine, before=None) -> list:
    """Record the tickets handed to `decode_engine` (calling `before(ticket)` first)."""
    tickets, real = [], decode_engine.submit_imported

    def submit_imported(prefilled, sink):
        tickets.append(prefilled.ticket)
        if before is not None:
            before(prefilled.ticket)
        return real(prefilled, sink)

    decode_engine.submit_imported = submit_imported
    return tickets


# -- 4. a collective holder that lost the state -------------------------------------------------
def test_a_decode_engine_keeps_no_prefix_for_a_lost_import(tiny_checkpoint):
    """A 127-token prompt: the decode instance's first step for it ends on a page boundary,
    so (prefix cache on) it plans to keep that page. The state is gone from its collective
    holder before the pull: the request ends UNAVAILABLE (policy fail), the decode engine
    forgets the planned key, and a prompt that extends it is served there from scratch (a
    stale key would send it to a cached prefix the worker never kept)."""
    from workers.handoff import CollectiveCarrier, LocalEndpoint

    pre, dec = ModelWorker(model_of(tiny_checkpoint)), ModelWorker(model_of(tiny_checkpoint))
    pre.carrier = CollectiveCarrier("cpu", timeout_s=20)
    pre.carrier.endpoint = LocalEndpoint(pre.carrier)
    dec.carrier = CollectiveCarrier("cpu", timeout_s=20)
    engines = [Engine(LocalWorkerGroup([w]), load_tokenizer(),
                      KVCacheManager(KVLayout.for_model(w.model.cfg, 4), num_pages=4096),
                      EngineConfig(prefix_cache=True)).start() for w in (pre, dec)]  # fmt: skip
    router = DisaggRouter([engines[0]], [engines[1]], on_failure="fail")
    spy_imports(engines[1], before=lambda ticket: pre.carrier.drop(ticket.key))  # lost before the pull
    prompt = prompts(1, length=127, seed=77)[0]
    col = run(router, [GenerateRequest("lost", prompt, GREEDY)])
    final = col.final("lost")
    assert final.unavailable and "no longer holds the state" in final.error, final
    first = col.tokens("lost")[0]
    assert engines[1].wait_idle(timeout=30) and len(engines[1].scheduler.prefix) == 0
    again = run(engines[1], [GenerateRequest("again", (*prompt, first, 5, 6), GREEDY)])
    assert again.final("again").finish_reason == "length" and not again.final("again").error
    router.stop()
