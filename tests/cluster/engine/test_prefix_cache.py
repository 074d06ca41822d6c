"""The prefix cache: a conversation that grows turn by turn reuses its earlier state.

Oracles: the same greedy requests on an engine without the cache (tokens must be equal),
the page arithmetic of `cached_tokens` (the longest cached page boundary that leaves a
token to run), and a sequence continued from a kept state against the sequence itself.
"""

from __future__ import annotations

import pytest
import torch

from cluster.backends.local import LocalWorkerGroup
from cluster.engine.engine import Engine, EngineConfig
from cluster.engine.prefix_cache import page_keys
from cluster.engine.requests import GenerateRequest
from encoding.tokenizer import load_tokenizer
from tests.cluster.engine.test_engine import prompts, run
from workers.kv_cache import KVCacheManager, KVLayout
from workers.model import Batch
from workers.step import SamplingParams
from workers.weights import load_model
from workers.worker import ModelWorker

PAGE = 128


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, dtype=torch.float32, simulate_quant=False, progress=False)


def engine_for(worker, cfg, prefix_cache: bool, num_pages: int = 4096, max_batch_tokens: int = 512) -> Engine:
    kv = KVCacheManager(KVLayout.for_model(cfg, 4), num_pages=num_pages, page_size=PAGE)
    config = EngineConfig(max_batch_tokens=max_batch_tokens, prefix_cache=prefix_cache)
    group = worker if isinstance(worker, LocalWorkerGroup) else LocalWorkerGroup([worker])
    return Engine(group, load_tokenizer(), kv, config).start()


def agent_loop(engine: Engine, turns: int = 3, out: int = 40) -> list[tuple[list[int], int]]:
    """Each turn's prompt = the previous prompt + its answer + a new message; returns
    (tokens, cached_tokens) per turn."""
    greedy = SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True)
    news = prompts(turns, length=150, seed=31)
    history: list[int] = []
    results = []
    for t in range(turns):
        prompt = history + list(news[t])
        col = run(engine, [GenerateRequest(f"turn{t}", tuple(prompt), greedy)])
        answer = col.tokens(f"turn{t}")
        results.append((answer, col.final(f"turn{t}").cached_tokens))
        history = prompt + answer
    return results


def test_agent_loop_reuses_its_turns_and_gives_the_same_tokens(model):
    plain = engine_for(ModelWorker(model), model.cfg, prefix_cache=False)
    ref = agent_loop(plain)
    plain.stop()
    cached = engine_for(ModelWorker(model), model.cfg, prefix_cache=True)
    got = agent_loop(cached)
    assert [a for a, _ in got] == [a for a, _ in ref]
    assert got[0][1] == 0 and ref[1][1] == 0
    # turn t's prompt starts with all of turn t-1's tokens (prompt + answer - its last,
    # which was never fed): the longest kept page boundary inside them is reused
    lengths = [150 + 40 * 0, 150 * 2 + 40, 150 * 3 + 40 * 2]
    for t in (1, 2):
        fed_before = lengths[t - 1] + 40 - 1
        assert got[t][1] == fed_before // PAGE * PAGE, (t, got[t][1])
    load = cached.load()
    assert load["kv_pages_used"] == 0 and load["kv_pages_cached"] > 0 and load["prefix_hits"] == 2
    worker = cached.worker.workers[0]
    assert len(worker.prefixes) == len(cached.scheduler.prefix) and worker.num_states() == 0
    cached.stop()


def test_prefixes_give_way_to_requests_under_pressure(model):
    """Kept prefixes are evicted (worker and index agree) when a request needs their pages,
    and every request still gets the right tokens."""
    big = GenerateRequest("big", prompts(1, length=1100, seed=5)[0], SamplingParams(max_tokens=8, temperature=0.0))
    plain = engine_for(ModelWorker(model), model.cfg, prefix_cache=False)
    ref = agent_loop(plain)
    ref_big = run(plain, [big]).tokens("big")
    plain.stop()
    probe = KVCacheManager(KVLayout.for_model(model.cfg, 4), num_pages=1, page_size=PAGE)
    budget = probe.pages_for(1100 + 8 + 1) + probe.pages_for(2 * PAGE)  # big fits only once prefixes go
    cached = engine_for(ModelWorker(model), model.cfg, prefix_cache=True, num_pages=budget)
    got = agent_loop(cached)
    index = cached.scheduler.prefix
    assert [a for a, _ in got] == [a for a, _ in ref] and index.hits > 0 and len(index) > 0
    assert run(cached, [big]).tokens("big") == ref_big
    assert cached.wait_idle() and index.evictions > 0
    assert len(cached.worker.workers[0].prefixes) == len(index)
    cached.stop()


def test_expert_parallel_requests_follow_their_prefix(tiny_checkpoint):
    group = LocalWorkerGroup.load(tiny_checkpoint, 2, dtype=torch.float32, simulate_quant=False)
    cached = engine_for(group, group.model_config, prefix_cache=True)
    got = agent_loop(cached)
    single = load_model(tiny_checkpoint, dtype=torch.float32, simulate_quant=False, progress=False)
    plain = engine_for(ModelWorker(single), single.cfg, prefix_cache=False)
    ref = agent_loop(plain)
    plain.stop()
    assert [a for a, _ in got] == [a for a, _ in ref] and got[2][1] > got[1][1] > 0
    kept = sum(len(w.prefixes) for w in group.workers)
    assert kept == len(cached.scheduler.prefix) == len(group.prefix_rank)
    cached.stop()


def test_a_restored_state_continues_like_the_original(model):
    model.configure_kv(page_size=PAGE)
    pool = model.kv
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 120000, (2 * PAGE + 20,), generator=gen)
    st = model.new_state()
    model(Batch.build([ids[: 2 * PAGE]], [st]), [st])
    snap = pool.snapshot(st)
    used = pool.used_pages
    clone = pool.restore(snap)
    assert pool.used_pages == used and clone.pages == st.pages  # shared, not copied
    a = model.logits(model(Batch.build([ids[2 * PAGE :]], [st]), [st]))
    b = model.logits(model(Batch.build([ids[2 * PAGE :]], [clone]), [clone]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    st.free()
    pool.drop(snap)
    assert pool.used_pages == len(clone.pages)  # the clone still holds the shared pages
    clone.free()
    assert pool.used_pages == 0 and pool.used_slots == 0


def test_page_keys_chain():
    toks = list(range(3 * PAGE + 5))
    keys = page_keys(toks, PAGE)
    assert len(keys) == 3 and page_keys(toks[:PAGE], PAGE) == keys[:1]
    assert page_keys(toks[2 * PAGE :], PAGE, keys[:2]) == keys  # extending = computing at once
    other = page_keys([1] + toks[1:], PAGE)
    assert all(a != b for a, b in zip(other, keys, strict=True))  # a change in page 0 changes every key
