"""KV handoff faults between Ray instances on a real two-node Ray cluster (issue #6).

A prefill instance's actor is killed while the driver waits for a request's export, or
the export outlasts `handoff_timeout_s`. Either way the request is recomputed with the
tokens an undisturbed run gives, none repeated (policy `recompute`), or ends UNAVAILABLE
(`fail`); afterwards no KV page is in use on either side and both instances serve again.

The export is made slow on purpose with the actors' test hook (`RankWorker.set_export_delay`),
so the kill lands while the state is still on the actor and the driver is blocked in
`RayWorkerGroup.export` (`exporting` names the rank it waits for).
"""

from __future__ import annotations

import time

import pytest

from cluster.engine.engine import Engine, EngineConfig
from cluster.engine.pool_router import DisaggRouter
from cluster.engine.requests import GenerateRequest
from encoding.tokenizer import load_tokenizer
from tests.cluster.engine.test_engine import Collector, prompts, run
from tests.cluster.support import instance
from workers.kv_cache import KVCacheManager, KVLayout
from workers.step import SamplingParams

ray = pytest.importorskip("ray")

PROMPT, PROMPT_AFTER = prompts(2, length=40, seed=61)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
# top_k: over a random model's nearly flat distribution float noise moves a CDF step; over 20 it cannot
SEEDED = SamplingParams(max_tokens=10, temperature=0.9, top_k=20, seed=7, ignore_eos=True)
REQUESTS = {"greedy": (PROMPT, GREEDY), "seeded": (PROMPT, SEEDED), "after": (PROMPT_AFTER, GREEDY)}


def request(uid: str) -> GenerateRequest:
    prompt, params = REQUESTS[uid]
    return GenerateRequest(uid, prompt, params)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint) -> dict[str, list[int]]:
    """Undisturbed tokens: one plain in-process engine."""
    local = instance(tiny_checkpoint, simulate_quant=False)
    col = run(local, [request(uid) for uid in REQUESTS])
    local.stop()
    return {uid: col.tokens(uid) for uid in REQUESTS}


def disagg(groups, policy: str, handoff_timeout_s: float = 30.0) -> DisaggRouter:
    engines = []
    for group, timeout in zip(groups, (handoff_timeout_s, 30.0), strict=True):
        kv = KVCacheManager(KVLayout.for_model(group.model_config, 4), num_pages=4096)
        engines.append(Engine(group, load_tokenizer(), kv, EngineConfig(handoff_timeout_s=timeout)).start())
    return DisaggRouter([engines[0]], [engines[1]], on_failure=policy)


def set_export_delay(group, seconds: float) -> None:
    ray.get([a.set_export_delay.remote(seconds) for a in group.actors], timeout=60)


def rank_exporting(group, uid: str, timeout: float = 60.0) -> int:
    """The rank whose export of `uid` the driver is blocked on (polled, bounded)."""
    deadline = time.monotonic() + timeout
    while (rank := group.exporting.get(uid)) is None:
        assert time.monotonic() < deadline, f"{uid}: the driver never started its export"
        time.sleep(0.01)
    return rank


def check_clean_and_serving(router: DisaggRouter, reference) -> None:
    """Nothing held on either side (engine pages, scheduler, actors' states), then a new
    request goes through both instances with the undisturbed tokens."""
    assert router.wait_idle(timeout=120)
    for engine in router.engines:
        load = engine.load()
        assert (load["running"], load["waiting"], load["kv_pages_used"], load["worker_states"]) == (0, 0, 0, 0), load
        assert engine.kv.used_pages == 0 and not engine.worker.owner and not engine.worker.exporting
    handoffs = router.handoffs
    col = run(router, [request("after")])
    assert col.tokens("after") == reference["after"] and col.final("after").finish_reason == "length"
    assert router.handoffs == handoffs + 1  # through the prefill instance, then the decode one
    assert router.wait_idle(timeout=60) and all(e.load()["kv_pages_used"] == 0 for e in router.engines)


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_prefill_actor_killed_during_the_export(groups, reference, policy):
    prefill_group, _ = groups
    set_export_delay(prefill_group, 60.0)  # longer than the test: only the kill ends the export
    router = disagg(groups, policy)
    uid = "seeded" if policy == "recompute" else "greedy"
    col = Collector()
    router.submit(request(uid), col.sink(uid))
    rank = rank_exporting(prefill_group, uid)
    victim = prefill_group.actors[rank]
    ray.kill(victim, no_restart=True)
    col.wait([uid], timeout=120)
    final = col.final(uid)
    if policy == "recompute":
        assert col.tokens(uid) == reference[uid] and final.finish_reason == "length"
        assert final.completion_tokens == GREEDY.max_tokens and router.recomputed == 1
    else:
        assert final.finish_reason == "error" and final.unavailable and "handoff" in final.error
        assert col.tokens(uid) == reference[uid][:1]  # the first token, streamed before the loss
        assert router.recomputed == 0
    deadline = time.monotonic() + 120  # the prefill instance rebuilds itself at its next step
    while victim in prefill_group.actors and time.monotonic() < deadline:
        time.sleep(0.05)
    assert victim not in prefill_group.actors
    check_clean_and_serving(router, reference)
    router.stop()


def test_an_export_past_the_handoff_timeout_counts_as_lost(groups, reference):
    """The exporting actor is alive but slow: the handoff gives up after its timeout, the
    request is recomputed, and the actor drops the state once its export runs; the
    instance is not rebuilt."""
    prefill_group, _ = groups
    actors = list(prefill_group.actors)
    set_export_delay(prefill_group, 5.0)
    router = disagg(groups, "recompute", handoff_timeout_s=1.5)
    try:
        col = run(router, [request("greedy")])
    finally:
        set_export_delay(prefill_group, 0.0)  # queued behind the slow export: returns after it
    assert col.tokens("greedy") == reference["greedy"] and col.final("greedy").finish_reason == "length"
    assert router.recomputed == 1 and router.handoffs == 1  # the recompute's own handoff, on the decode side
    check_clean_and_serving(router, reference)
    assert all(a is b for a, b in zip(prefill_group.actors, actors, strict=True))  # the same actors throughout
    router.stop()
