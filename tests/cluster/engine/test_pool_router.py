"""The router over a pool's instances: placement by load, retry on a healthy instance.

Oracle: the tokens one engine alone gives for the same greedy requests.
"""

from __future__ import annotations

import pytest
import torch

from cluster.backends.local import LocalWorkerGroup
from cluster.engine.engine import Engine, EngineConfig
from cluster.engine.pool_router import InstanceRouter
from cluster.engine.requests import EngineUnavailableError, GenerateRequest
from encoding.tokenizer import load_tokenizer
from tests.cluster.engine.test_engine import Collector, prompts, run
from workers.kv_cache import KVCacheManager, KVLayout
from workers.step import SamplingParams
from workers.weights import load_model
from workers.worker import ModelWorker


def instance(checkpoint) -> Engine:
    model = load_model(checkpoint, dtype=torch.float32, progress=False)
    kv = KVCacheManager(KVLayout.for_model(model.cfg, 4), num_pages=4096)
    return Engine(LocalWorkerGroup([ModelWorker(model)]), load_tokenizer(), kv, EngineConfig(max_running=8)).start()


def requests(n: int = 6) -> list[GenerateRequest]:
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    return [GenerateRequest(f"q{i}", p, greedy) for i, p in enumerate(prompts(n, length=12, seed=9))]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    engine = instance(tiny_checkpoint)
    col = run(engine, requests())
    engine.stop()
    return {r.uid: col.tokens(r.uid) for r in requests()}


def test_requests_spread_by_load_and_give_the_same_tokens(tiny_checkpoint, reference):
    engines = [instance(tiny_checkpoint), instance(tiny_checkpoint)]
    router = InstanceRouter(engines)
    col = Collector()
    with engines[0]._cv, engines[1]._cv:  # hold both loops: placement sees only queued requests
        for r in requests():
            router.submit(r, col.sink(r.uid))
        placed = [router._placed[r.uid].instance for r in requests()]
    assert sorted(placed) == [0, 0, 0, 1, 1, 1]
    col.wait([r.uid for r in requests()])
    for r in requests():
        assert col.tokens(r.uid) == reference[r.uid], r.uid
    assert router.wait_idle()
    load = router.load()
    assert load["instances"] == 2 and load["running"] == 0 and load["kv_pages_used"] == 0
    assert load["kv_pages_total"] == sum(e.kv.num_pages for e in engines)
    assert not router.abort("q0")  # finished: unknown to the router now
    router.stop()


def test_lost_instance_requests_are_retried_on_a_healthy_one(tiny_checkpoint, reference):
    engines = [instance(tiny_checkpoint), instance(tiny_checkpoint)]
    real = engines[0].worker.execute
    calls = {"n": 0}

    def lost_once(plan):
        calls["n"] += 1
        if calls["n"] == 1:
            raise EngineUnavailableError("instance 0 lost a worker")
        return real(plan)

    engines[0].worker.execute = lost_once
    router = InstanceRouter(engines)
    col = run(router, requests(2))  # one lands on each instance
    for r in requests(2):
        assert col.final(r.uid).finish_reason == "length" and not col.final(r.uid).unavailable
        assert col.tokens(r.uid) == reference[r.uid], r.uid
    assert router.retries == 1 and calls["n"] >= 1
    assert router.wait_idle() and all(e.kv.used_pages == 0 for e in engines)
    router.stop()


def test_a_lost_request_with_tokens_out_is_not_retried(tiny_checkpoint):
    engines = [instance(tiny_checkpoint), instance(tiny_checkpoint)]
    real = engines[0].worker.execute
    calls = {"n": 0}

    def lost_later(plan):
        calls["n"] += 1
        if calls["n"] == 3:  # after the first tokens were streamed
            raise EngineUnavailableError("instance 0 lost a worker")
        return real(plan)

    engines[0].worker.execute = lost_later
    router = InstanceRouter(engines)
    col = run(router, requests(1))
    final = col.final("q0")
    assert final.unavailable and final.finish_reason == "error" and col.tokens("q0")
    assert router.retries == 0
    router.stop()
