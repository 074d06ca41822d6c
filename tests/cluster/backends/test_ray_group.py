"""The Ray backend on a real two-node Ray cluster started on loopback addresses.

Equivalence: W = 2 and W = 4 workers spread over both nodes (gloo all-to-all inside the
actors) give the same tokens as the in-process W = 1 engine. Failure: killing a worker actor while a
request streams ends it within 10 s, the instance is rebuilt, later requests succeed.
"""

from __future__ import annotations

import time

import pytest

from cluster.engine.engine import Engine, EngineConfig
from cluster.engine.requests import GenerateRequest
from encoding.tokenizer import load_tokenizer
from tests.cluster.engine.test_engine import Collector, prompts, run
from tests.cluster.support import instance
from workers.kv_cache import KVCacheManager, KVLayout
from workers.step import SamplingParams

ray = pytest.importorskip("ray")


def ray_engine(checkpoint, world_size: int, cp_min_tokens: int = 0) -> Engine:
    from cluster.backends.ray_group import RayWorkerGroup

    group = RayWorkerGroup(checkpoint, world_size, dtype="float32", num_cpus=1,
                           resources=[{"node_a": 1}, {"node_b": 1}] * (world_size // 2), step_timeout=10)  # fmt: skip
    kv = KVCacheManager(KVLayout.for_model(group.model_config, 4), num_pages=4096)
    config = EngineConfig(context_parallel_min_tokens=cp_min_tokens)
    return Engine(group, load_tokenizer(), kv, config).start()


def requests() -> list[GenerateRequest]:
    ps = prompts(3, length=24, seed=21)
    # top_k: over a random model's nearly flat distribution float noise moves a CDF step; over 20 it cannot
    return [GenerateRequest(f"r{i}", p, SamplingParams(max_tokens=8, temperature=0.0 if i else 0.8, seed=3, top_k=20,
                                                      ignore_eos=True)) for i, p in enumerate(ps)]  # fmt: skip


@pytest.mark.parametrize(("world_size", "cp_min_tokens"), [(2, 16), (4, 0)])
def test_workers_on_two_nodes_match_one_process(ray_cluster, tiny_checkpoint, world_size, cp_min_tokens):
    """W = 2 also prefills context-parallel (gloo between the actors): the 24- to 30-token
    prompts are split over both nodes."""
    local = instance(tiny_checkpoint)
    ref = run(local, requests())
    local.stop()
    engine = ray_engine(tiny_checkpoint, world_size, cp_min_tokens)
    assert set(engine.worker.nodes()) == {"127.0.0.2", "127.0.0.3"}  # spread over both Ray nodes
    col = run(engine, requests())
    for r in requests():
        assert col.tokens(r.uid) == ref.tokens(r.uid), r.uid
    assert engine.wait_idle() and engine.kv.used_pages == 0 and engine.worker.num_states() == 0
    assert engine.worker.cp.chunks == (3 if cp_min_tokens else 0)
    engine.stop()  # the engine first: its loop must not step (and rebuild) a stopped group
    engine.worker.stop()


def test_killed_worker_fails_requests_fast_and_instance_is_rebuilt(ray_cluster, tiny_checkpoint):
    engine = ray_engine(tiny_checkpoint, 2)
    col = Collector()
    engine.submit(GenerateRequest("long", prompts(1)[0], SamplingParams(max_tokens=100000, ignore_eos=True)),
                  col.sink("long"))  # fmt: skip
    deadline = time.monotonic() + 30
    while len(col.outputs.get("long", [])) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = engine.worker.actors[1]
    t0 = time.monotonic()
    ray.kill(victim, no_restart=True)
    col.wait(["long"], timeout=30)
    # a dead actor fails its step at once (or, on a loaded machine, at the 10 s step timeout); then the rebuild
    assert time.monotonic() - t0 < 25
    assert col.final("long").finish_reason == "error" and col.final("long").unavailable  # gRPC: UNAVAILABLE
    after = run(engine, requests()[:1])  # the rebuilt instance serves again
    assert after.final("r0").finish_reason == "length" and len(after.tokens("r0")) == 8
    engine.stop()  # the engine first: its loop must not step (and rebuild) a stopped group
    engine.worker.stop()


def test_prefix_cache_and_kv_handoff_across_ray_actors(ray_cluster, tiny_checkpoint):
    """Prefixes kept on Ray actors and states handed from one Ray instance to another
    (through the object store) give the tokens of one plain process."""
    from cluster.backends.ray_group import RayWorkerGroup
    from cluster.engine.pool_router import DisaggRouter
    from tests.cluster.engine.test_prefix_cache import agent_loop

    local = instance(tiny_checkpoint, simulate_quant=False)
    ref = agent_loop(local)
    local.stop()

    def ray_instance(prefix_cache: bool) -> Engine:
        group = RayWorkerGroup(tiny_checkpoint, 2, dtype="float32", simulate_quant=False, num_cpus=1,
                               resources=[{"node_a": 1}, {"node_b": 1}], step_timeout=120)  # fmt: skip
        kv = KVCacheManager(KVLayout.for_model(group.model_config, 4), num_pages=4096)
        return Engine(group, load_tokenizer(), kv, EngineConfig(prefix_cache=prefix_cache)).start()

    prefill, decode = ray_instance(True), ray_instance(False)
    router = DisaggRouter([prefill], [decode])
    got = agent_loop(router)
    assert [a for a, _ in got] == [a for a, _ in ref]
    assert got[1][1] > 0 and got[2][1] > 0  # the prefill actors kept the earlier turns' prompts
    assert router.handoffs == 3 and router.wait_idle()
    assert prefill.kv.used_pages - prefill.load()["kv_pages_cached"] == 0 and decode.kv.used_pages == 0
    router.stop()
    for e in (prefill, decode):
        e.worker.stop()
    deadline = time.monotonic() + 30  # placement groups are removed asynchronously
    while any(k.startswith("node_a_group") for k in ray.available_resources()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(k.startswith("node_a_group") for k in ray.available_resources())  # none left behind
