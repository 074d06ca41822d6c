"""KV handoffs between Ray actors (cluster/backends/ray_handoff.py): the ticket holds object
refs (or names the holding actor), not the state; a dead holder fails the import alone;
a lost ticket is recomputed through the engines; a collective pull over gloo between
actors on two nodes. Oracle: a colocated engine's tokens."""


from __future__ import annotations

import pickle
import time

import pytest
import torch

from cluster.backends.ray_handoff import StateRefs
from cluster.engine.engine import Engine, EngineConfig
from cluster.engine.pool_router import DisaggRouter
from cluster.engine.requests import GenerateRequest
from encoding.tokenizer import load_tokenizer
from tests.cluster.backends.test_handoff_transport import assert_states_equal, spy_imports
from tests.cluster.engine.test_disagg import engine, model_of
from tests.cluster.engine.test_engine import prompts, run
from workers.handoff import layout_of
from workers.kv_cache import KVCacheManager, KVLayout
from workers.model import Batch
from workers.step import SamplingParams, SeqWork, StepPlan
from workers.worker import ModelWorker

PROMPT = prompts(1, length=300, seed=71)[0]  # 2 full pages of 128 and 44 tokens into the third
CUT = 200  # first chunk [0, 200), exported last chunk [200, 300)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
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


def disagg(groups, policy: str) -> DisaggRouter:
    engines = []
    for group in groups:
        kv = KVCacheManager(KVLayout.for_model(group.model_config, 4), num_pages=4096)
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
    from cluster.backends.ray_group import WorkerLostError

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
    from cluster.backends.ray_handoff import RayEndpoint
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
