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


def ray_engine(checkpoint, world_size: int, cp_min_tokens: int = 0, health_check_s: float = 5.0) -> Engine:
    from cluster.backends.ray_group import RayWorkerGroup

    group = RayWorkerGroup(checkpoint, world_size, dtype="float32", num_cpus=1,
                           resources=[{"node_a": 1}, {"node_b": 1}] * (world_size // 2), step_timeout=10)  # fmt: skip
    kv = KVCacheManager(KVLayout.for_model(group.model_config, 4), num_pages=4096)
    config = EngineConfig(context_parallel_min_tokens=cp_min_tokens, health_check_s=health_check_s)
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


def test_a_dead_idle_worker_never_blocks_its_pool(ray_cluster, tiny_checkpoint):
    """A pool of 2 instances x 2 workers; one worker of an idle instance is killed. Load and
    info queries keep answering at once, requests go to the healthy instance, and the dead
    one is rebuilt in the background (its state `rebuilding`, then `serving` again)."""
    from cluster.engine.pool_router import InstanceRouter
    from cluster.gateway import info
    from cluster.gateway.core import Gateway, ServingInfo

    engines = [ray_engine(tiny_checkpoint, 2, health_check_s=0.5) for _ in range(2)]
    router = InstanceRouter(engines)
    gateway = Gateway(router, ServingInfo(engines[0].model_config, str(tiny_checkpoint), "float32", "ray", 4))
    ray.kill(engines[1].worker.actors[0], no_restart=True)
    seen, served = set(), 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (served >= 3 and "rebuilding" in seen and engines[1].health == "serving"):
        t0 = time.monotonic()
        server_info = info.server_info(gateway)  # the gateway's GetServerInfo, without the transport
        assert time.monotonic() - t0 < 2.0, "GetServerInfo took over 2 s"
        seen |= set(server_info.pools[0].instance_states)
        request = GenerateRequest(f"q{served}", prompts(1)[0], SamplingParams(max_tokens=2, ignore_eos=True))
        col = run(router, [request])
        assert col.final(request.uid).finish_reason == "length", col.final(request.uid)
        served += 1
    assert "rebuilding" in seen and engines[1].health == "serving", (seen, engines[1].health)
    assert router.load()["instances_unhealthy"] == 0
    col = run(engines[1], requests()[:1])  # the rebuilt instance serves again
    assert col.final("r0").finish_reason == "length" and len(col.tokens("r0")) == 8
    router.stop()
    for engine in engines:
        engine.worker.stop()


def test_a_worker_dying_in_its_decode_step_fails_fast_and_is_rebuilt(ray_cluster, tiny_checkpoint):
    """The fault harness's `die` in a Ray actor: the rank holding the request exits in its
    next decode step (armed on both ranks; the one without work never reaches the point)."""
    engine = ray_engine(tiny_checkpoint, 2)
    first = run(engine, requests()[:1])  # warm, and the reference
    ray.get([a.arm_fault.remote("worker.decode", "die") for a in engine.worker.actors])
    t0 = time.monotonic()
    col = run(engine, requests()[:1])
    assert time.monotonic() - t0 < 25 and col.final("r0").finish_reason == "error" and col.final("r0").unavailable
    after = run(engine, requests()[:1])  # the rebuilt instance
    assert after.tokens("r0") == first.tokens("r0") and after.final("r0").finish_reason == "length"
    assert engine.wait_idle() and engine.kv.used_pages == 0
    engine.stop()
    engine.worker.stop()
