"""How a KV handoff's state travels (workers/handoff.py, issue #6): shipped layer by layer
while the prefill step computes, fetched by the decode worker through its ticket.

Oracles: the state `KVPool.export` copies out of an identical worker after the same plan
(equal tensor for tensor), a single worker's export for a context-parallel prefill (CP
sums in another order: the tolerance of tests/workers/test_cp.py), a twin decode worker
running the same plan without the lost import, and a colocated engine's tokens for a
disaggregated run over Ray actors (the ticket then holds object refs, not the state).
"""

from __future__ import annotations

import pickle
import time
from dataclasses import replace

import pytest
import torch

from cluster.engine import Engine, EngineConfig
from cluster.messages import GenerateRequest, SamplingParams, SeqWork, StepPlan
from cluster.router_actor import DisaggRouter
from cluster.worker_group import LocalWorkerGroup
from encoding.tokenizer import load_tokenizer
from tests.cluster.test_disagg import engine, model_of
from tests.cluster.test_engine import prompts, run
from workers.handoff import Carrier, HandoffFetchError, StateRefs, layout_of
from workers.kv_cache import KVCacheManager, KVLayout
from workers.kv_pool import SeqExport
from workers.model import Batch
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
    group = LocalWorkerGroup(tiny_checkpoint, 2, dtype=torch.float32, simulate_quant=False)
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


# -- 4. through the Ray object store ------------------------------------------------------------

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
    engines = [Engine(w, load_tokenizer(), KVCacheManager(KVLayout.for_model(w.model.cfg, 4), num_pages=4096),
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


RAY_PROMPT = prompts(1, length=150, seed=74)[0]
# top_k: over a random model's nearly flat distribution float noise moves a CDF step; over 20 it cannot
SEEDED = SamplingParams(max_tokens=8, temperature=0.9, top_k=20, seed=7, ignore_eos=True)
RAY_REQUESTS = (GenerateRequest("greedy", RAY_PROMPT, GREEDY), GenerateRequest("seeded", RAY_PROMPT, SEEDED))


@pytest.fixture(scope="module")
def colocated(tiny_checkpoint) -> dict[str, list[int]]:
    local = ModelWorker(model_of(tiny_checkpoint))
    e = engine(local, local.model.cfg)
    col = run(e, list(RAY_REQUESTS))
    e.stop()
    return {r.uid: col.tokens(r.uid) for r in RAY_REQUESTS}


def spy_imports(decode_engine, before=None) -> list:
    """Record the tickets handed to `decode_engine` (calling `before(ticket)` first)."""
    tickets, real = [], decode_engine.submit_imported

    def submit_imported(prefilled, sink, state):
        tickets.append(state)
        if before is not None:
            before(state)
        return real(prefilled, sink, state)

    decode_engine.submit_imported = submit_imported
    return tickets


def disagg(groups, policy: str) -> DisaggRouter:
    engines = []
    for group in groups:
        kv = KVCacheManager(KVLayout.for_model(group.model.cfg, 4), num_pages=4096)
        engines.append(Engine(group, load_tokenizer(), kv, EngineConfig(handoff_timeout_s=30.0)).start())
    return DisaggRouter([engines[0]], [engines[1]], on_failure=policy)


def kill_and_wait(actor) -> None:
    import ray

    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 30
    while True:  # until the actor is gone for sure
        try:
            ray.get(actor.ready.remote(), timeout=5)
        except ray.exceptions.RayError:
            return
        assert time.monotonic() < deadline, "the killed actor still answers"


def test_a_ray_handoff_passes_object_refs_not_the_state(groups, tiny_checkpoint, colocated):
    """The colocated tokens; the decode instance gets a ticket of object refs (a few hundred
    bytes through the driver) that counts the real state's bytes, and its layers are the
    state one local worker computes for the prompt."""
    local = ModelWorker(model_of(tiny_checkpoint))
    router = disagg(groups, "fail")
    tickets = spy_imports(router.engines[1])
    req = RAY_REQUESTS[0]
    col = run(router, [req])
    assert col.tokens("greedy") == colocated["greedy"] and col.final("greedy").finish_reason == "length"
    assert router.handoffs == 1 and len(tickets) == 1
    ticket = tickets[0]
    assert isinstance(ticket, StateRefs) and ticket.num_tokens == len(RAY_PROMPT)
    assert len(ticket.refs) == len(local.model.layers)
    assert len(pickle.dumps(ticket)) < 8192  # what the driver passes on: refs and a layout
    fetched = ticket.fetch(30)  # the prefill actor owns the objects and is alive: the real layers
    st = local.model.new_state()
    local.model(Batch.build([torch.tensor(RAY_PROMPT)], [st]), [st])
    oracle = local.model.kv.export(st)
    st.free()
    assert ticket.nbytes() == fetched.nbytes() == oracle.nbytes() > 8192
    assert ticket.layout == layout_of(fetched) == layout_of(oracle)
    assert_states_equal(fetched, oracle, tol=1e-4)
    assert router.handoff_bytes == ticket.nbytes()
    assert router.wait_idle(timeout=60)
    router.stop()


def test_a_state_whose_prefill_actor_died_fails_the_import_alone(groups):
    """The prefill actor that put the layers dies after its export returned: the decode
    instance's fetch fails, that request alone fails (no state held for it) and the
    instance steps on; the prefill instance rebuilds itself at its next step."""
    from cluster.ray_backend import WorkerLostError

    prefill, decode = groups
    uid, n = "lost", len(RAY_PROMPT)
    res = prefill.execute(StepPlan(work=(SeqWork(uid, RAY_PROMPT, 0, sample=True),), sampling={uid: GREEDY},
                                   exports=frozenset({uid})))  # fmt: skip
    rank = prefill.owner[uid]
    ticket = prefill.export(uid)
    assert isinstance(ticket, StateRefs) and prefill.num_states() == 0
    victim = prefill.actors[rank]
    kill_and_wait(victim)
    other = prompts(1, length=20, seed=75)[0]
    t0 = time.monotonic()
    got = decode.execute(StepPlan(
        work=(SeqWork(uid, (res.tokens[uid],), n, sample=True), SeqWork("fresh", other, 0, sample=True)),
        sampling={uid: GREEDY, "fresh": GREEDY}, num_generated={uid: 1}, imports={uid: ticket},
    ))  # fmt: skip
    assert time.monotonic() - t0 < 30  # failed on the lost owner, not on the fetch timeout
    assert set(got.failed) == {uid} and "objects are lost" in got.failed[uid], got.failed
    assert set(got.tokens) == {"fresh"}
    assert decode.num_states() == 1  # only "fresh"
    after = decode.execute(StepPlan(work=(SeqWork("fresh", (got.tokens["fresh"],), len(other), sample=True),),
                                    finished=(uid,), num_generated={"fresh": 1}))  # fmt: skip
    assert set(after.tokens) == {"fresh"} and not after.failed
    decode.execute(StepPlan(work=(), finished=("fresh",)))
    assert decode.num_states() == 0 and not decode.owner
    with pytest.raises(WorkerLostError):  # the dead actor's instance rebuilds itself
        prefill.execute(StepPlan(work=()))
    assert victim not in prefill.actors
    again = prefill.execute(StepPlan(work=(SeqWork("again", other, 0, sample=True),), sampling={"again": GREEDY}))
    assert again.tokens["again"] == got.tokens["fresh"]  # the same first token on the rebuilt instance
    prefill.execute(StepPlan(work=(), finished=("again",)))
    assert prefill.num_states() == 0


def test_a_lost_ticket_is_recomputed_through_the_engines(groups, colocated, monkeypatch):
    """Through the engines (policy `recompute`): the prefill actor holding the layers dies
    (and its instance is rebuilt) once the export returned, before the decode instance
    sees the ticket. The decode step's fetch fails, the request is recomputed from its
    prompt with its seed: the colocated tokens, none repeated; nothing stays held."""
    prefill_group, decode_group = groups
    owners, real_export = [], prefill_group.export
    failures, real_execute = [], decode_group.execute

    def execute(plan):
        result = real_execute(plan)
        failures.append(result.failed)
        return result

    monkeypatch.setattr(decode_group, "execute", execute)

    def export(uid, timeout=None):  # note the rank holding the state before it leaves
        owners.append(prefill_group.owner[uid])
        return real_export(uid, timeout=timeout)

    monkeypatch.setattr(prefill_group, "export", export)
    router = disagg(groups, "recompute")
    actors = list(prefill_group.actors)

    def lose_the_first(ticket) -> None:  # in the prefill engine's thread: its group is idle
        if len(owners) == 1:
            kill_and_wait(prefill_group.actors[owners[0]])
            prefill_group.rebuild()

    tickets = spy_imports(router.engines[1], before=lose_the_first)
    col = run(router, [RAY_REQUESTS[1]])
    final = col.final("seeded")
    assert col.tokens("seeded") == colocated["seeded"] and final.finish_reason == "length", final
    assert final.completion_tokens == SEEDED.max_tokens
    assert router.recomputed == 1 and router.handoffs == 2 and len(tickets) == 2
    lost = [f for f in failures if f]
    assert len(lost) == 1 and set(lost[0]) == {"seeded"} and "objects are lost" in lost[0]["seeded"], lost
    assert all(isinstance(t, StateRefs) for t in tickets)
    assert not any(a is b for a, b in zip(prefill_group.actors, actors, strict=True))  # rebuilt
    assert router.wait_idle(timeout=60)
    for e in router.engines:
        load = e.load()
        assert (load["running"], load["waiting"], load["kv_pages_used"], load["worker_states"]) == (0, 0, 0, 0), load
        assert e.kv.used_pages == 0 and not e.worker.owner
    router.stop()


def test_a_collective_handoff_between_ray_actors(groups, colocated):
    """Transport `collective` (last: it rebuilds both instances with it): the decode actor
    pulls each layer from the prefill actor holding it, over a gloo group of the two (nccl
    between GPUs), on the other node. The colocated tokens; the ticket names the holder and
    a key, not the state; a holder killed before the pull fails that request alone, fast."""
    from cluster.ray_backend import RayEndpoint
    from workers.handoff import PulledState

    for g in groups:
        g.transport = "collective"
        g.rebuild()
    prefill, decode = groups
    router = disagg(groups, "fail")
    tickets = spy_imports(router.engines[1])
    col = run(router, list(RAY_REQUESTS))
    for req in RAY_REQUESTS:
        assert col.tokens(req.uid) == colocated[req.uid] and col.final(req.uid).finish_reason == "length"
    assert router.handoffs == 2 and all(isinstance(t, PulledState) for t in tickets)
    assert all(isinstance(t.source, RayEndpoint) for t in tickets) and len(pickle.dumps(tickets[0])) < 8192
    assert router.handoff_bytes == sum(t.nbytes() for t in tickets) > 8192
    assert router.wait_idle(timeout=60)
    router.stop()
    for g in groups:
        assert g.num_states() == 0

    uid, n = "held", len(RAY_PROMPT)
    res = prefill.execute(StepPlan(work=(SeqWork(uid, RAY_PROMPT, 0, sample=True),), sampling={uid: GREEDY},
                                   exports=frozenset({uid})))  # fmt: skip
    ticket = prefill.export(uid)
    kill_and_wait(ticket.source.actor)  # the holder
    t0 = time.monotonic()
    got = decode.execute(StepPlan(work=(SeqWork(uid, (res.tokens[uid],), n, sample=True),), sampling={uid: GREEDY},
                                  num_generated={uid: 1}, imports={uid: ticket}))  # fmt: skip
    assert time.monotonic() - t0 < 20 and set(got.failed) == {uid} and "pulling the state" in got.failed[uid], got
    assert decode.num_states() == 0
    decode.execute(StepPlan(work=(), finished=(uid,)))
