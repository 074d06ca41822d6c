"""Prefill and decode instances with KV handoff.

Oracles: a colocated engine on the same checkpoint (greedy and seeded tokens must be
equal, prompts from 1 token to several pages), and a sequence continued from an imported
state against the sequence itself.
"""

from __future__ import annotations

import pytest
import torch

from cluster.engine import Engine, EngineConfig
from cluster.messages import GenerateRequest, SamplingParams
from cluster.router_actor import DisaggRouter
from cluster.worker_group import LocalWorkerGroup
from encoding.tokenizer import load_tokenizer
from tests.cluster.test_engine import prompts, run
from workers.kv_cache import KVCacheManager, KVLayout
from workers.model import Batch
from workers.weights import load_model
from workers.worker import ModelWorker

LENGTHS = (1, 5, 127, 128, 300)


def requests() -> list[GenerateRequest]:
    out = []
    for i, n in enumerate(LENGTHS):
        p = prompts(1, length=n, seed=40 + i)[0]
        greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        # top_k: a random model's distribution is nearly flat over 129280 tokens, where float
        # noise from another batch mix moves a CDF step; over 20 candidates it cannot
        seeded = SamplingParams(max_tokens=12, temperature=0.9, top_k=20, seed=100 + i, ignore_eos=True)
        out += [GenerateRequest(f"g{n}", p, greedy), GenerateRequest(f"s{n}", p, seeded)]
    return out


def engine(worker, cfg) -> Engine:
    kv = KVCacheManager(KVLayout.for_model(cfg, 4), num_pages=4096)
    return Engine(worker, load_tokenizer(), kv, EngineConfig(max_batch_tokens=256)).start()


def model_of(checkpoint):
    return load_model(checkpoint, dtype=torch.float32, simulate_quant=False, progress=False)


@pytest.fixture(scope="module")
def colocated(tiny_checkpoint):
    m = model_of(tiny_checkpoint)
    e = engine(ModelWorker(m), m.cfg)
    col = run(e, requests())
    e.stop()
    return {r.uid: col.tokens(r.uid) for r in requests()}


def test_handoff_gives_the_colocated_tokens(tiny_checkpoint, colocated):
    pre, dec = model_of(tiny_checkpoint), model_of(tiny_checkpoint)
    router = DisaggRouter([engine(ModelWorker(pre), pre.cfg)], [engine(ModelWorker(dec), dec.cfg)])
    col = run(router, requests())
    for r in requests():
        assert col.tokens(r.uid) == colocated[r.uid], r.uid
        assert col.final(r.uid).finish_reason == "length" and col.final(r.uid).completion_tokens == 12
    assert router.handoffs == len(requests()) and router.handoff_bytes > 0
    assert router.wait_idle()
    prefill, decode = router.engines
    assert prefill.stats.tokens_out == len(requests())  # one token each, then handed over
    assert decode.stats.tokens_out == 11 * len(requests())
    for e in router.engines:  # nothing left on either side
        assert e.kv.used_pages == 0 and e.worker.num_states() == 0
    assert pre.kv.used_pages == 0 and dec.kv.used_pages == 0
    router.stop()


def test_handoff_between_expert_parallel_instances(tiny_checkpoint, colocated):
    groups = [LocalWorkerGroup(tiny_checkpoint, 2, dtype=torch.float32, simulate_quant=False) for _ in range(2)]
    router = DisaggRouter([engine(groups[0], groups[0].model.cfg)], [engine(groups[1], groups[1].model.cfg)])
    col = run(router, requests()[:6])
    for r in requests()[:6]:
        assert col.tokens(r.uid) == colocated[r.uid], r.uid
    assert router.wait_idle() and all(g.num_states() == 0 for g in groups)
    router.stop()


def test_a_one_token_answer_never_leaves_the_prefill_instance(tiny_checkpoint):
    pre, dec = model_of(tiny_checkpoint), model_of(tiny_checkpoint)
    router = DisaggRouter([engine(ModelWorker(pre), pre.cfg)], [engine(ModelWorker(dec), dec.cfg)])
    req = GenerateRequest("one", prompts(1, seed=3)[0], SamplingParams(max_tokens=1, temperature=0.0))
    col = run(router, [req])
    assert col.final("one").finish_reason == "length" and len(col.tokens("one")) == 1
    assert router.handoffs == 0
    router.stop()


def test_an_imported_state_continues_like_the_original(tiny_checkpoint):
    m = model_of(tiny_checkpoint)
    other = model_of(tiny_checkpoint)
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(3, 120000, (300,), generator=gen)
    st = m.new_state()
    m(Batch.build([ids[:290]], [st]), [st])
    exp = m.kv.export(st)
    assert exp.num_tokens == 290 and exp.nbytes() > 0
    moved = other.kv.import_(exp)
    a = m.logits(m(Batch.build([ids[290:]], [st]), [st]))
    b = other.logits(other(Batch.build([ids[290:]], [moved]), [moved]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dsv4_serve_with_prefill_and_decode_pools(tiny_checkpoint, tmp_path):
    """The shipped manifest's topology through a real server: chats stream across the
    handoff, GetServerInfo shows both pools, greedy output equals the colocated engine's."""
    import yaml

    from tests.cluster.test_gateway import Server, generate, pb

    raw = yaml.safe_load(open("manifests/disagg-local.yaml"))
    raw["model"] = {"checkpoint": str(tiny_checkpoint), "dtype": "float32", "simulate_quant": False}
    raw["gateway"]["port"] = 0
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(raw))
    server = Server("-m", str(tmp_path / "m.yaml"))
    try:
        ids = list(prompts(1, length=40, seed=44)[0])
        out = list(server.stub.Generate(generate(ids, max_tokens=10, temperature=0.0, ignore_eos=True)))
        got = [t for r in out if r.WhichOneof("kind") == "chunk" for t in r.chunk.token_ids]
        assert out[-1].finish.finish_reason == "length" and len(got) == 10
        m = model_of(tiny_checkpoint)
        e = engine(ModelWorker(m), m.cfg)
        ref = run(e, [GenerateRequest("r", tuple(ids), SamplingParams(max_tokens=10, temperature=0.0,
                                                                      ignore_eos=True))]).tokens("r")  # fmt: skip
        e.stop()
        assert got == ref
        info = server.stub.GetServerInfo(pb.GetServerInfoRequest())
        pools = {p.name: p for p in info.pools}
        assert (pools["prefill"].role, pools["decode"].role) == ("prefill", "decode")
        assert [w.rank for w in pools["decode"].workers] == [0, 1] and pools["decode"].num_instances == 1
    finally:
        assert server.stop() == 0


def test_handoff_bytes_follow_the_kv_arithmetic(tiny_checkpoint):
    """What a handoff moves is exactly V4's state: bytes_per_seq (window and compressor
    rings) + bytes_per_token x tokens (entries and indexer keys), at a 128-token boundary."""
    m = model_of(tiny_checkpoint)
    layout = KVLayout.for_model(m.cfg, elem_bytes=4)
    for n in (128, 512):
        st = m.new_state()
        m(Batch.build([torch.randint(3, 120000, (n,))], [st]), [st])
        assert m.kv.export(st).nbytes() == layout.bytes_for(n)
        st.free()


def _lose_once(worker, method: str, after: int = 0):
    """Make `worker.method` fail like a dead worker on its (after+1)-th call."""
    from cluster.messages import EngineUnavailableError

    real, calls = getattr(worker, method), {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == after + 1:
            raise EngineUnavailableError(f"{method}: worker lost")
        return real(*args)

    setattr(worker, method, flaky)


@pytest.mark.parametrize("where", ["prefill export", "decode step"])
def test_lost_state_is_recomputed_without_a_repeated_token(tiny_checkpoint, colocated, where):
    pre, dec = model_of(tiny_checkpoint), model_of(tiny_checkpoint)
    prefill, decode = engine(ModelWorker(pre), pre.cfg), engine(ModelWorker(dec), dec.cfg)
    if where == "prefill export":  # the prefill worker dies while handing the state over
        _lose_once(prefill.worker, "export")
    else:  # the decode worker dies after a few tokens were streamed
        _lose_once(decode.worker, "execute", after=3)
    router = DisaggRouter([prefill], [decode], on_failure="recompute")
    req = next(r for r in requests() if r.uid == "s128")
    col = run(router, [req])
    assert col.tokens("s128") == colocated["s128"] and col.final("s128").finish_reason == "length"
    assert router.recomputed == 1 and router.wait_idle()
    assert prefill.kv.used_pages == decode.kv.used_pages == 0 and pre.kv.used_pages == dec.kv.used_pages == 0
    router.stop()


def test_lost_state_fails_fast_with_the_fail_policy(tiny_checkpoint):
    pre, dec = model_of(tiny_checkpoint), model_of(tiny_checkpoint)
    prefill, decode = engine(ModelWorker(pre), pre.cfg), engine(ModelWorker(dec), dec.cfg)
    _lose_once(prefill.worker, "export")
    router = DisaggRouter([prefill], [decode], on_failure="fail")
    col = run(router, [requests()[2]])
    final = col.final(requests()[2].uid)
    assert final.unavailable and final.finish_reason == "error" and "handoff" in final.error
    assert len(col.tokens(requests()[2].uid)) == 1  # the first token, sampled before the loss
    assert router.wait_idle() and prefill.kv.used_pages == decode.kv.used_pages == 0 and pre.kv.used_pages == 0
    router.stop()


def test_prefill_pool_prefix_cache_reaches_the_client(tiny_checkpoint):
    """A prefill instance with the prefix cache: later turns resume there, and the usage
    the decode instance sends at the end reports those cached tokens."""
    from tests.cluster.test_prefix_cache import agent_loop, engine_for

    pre, dec = model_of(tiny_checkpoint), model_of(tiny_checkpoint)
    prefill, decode = engine_for(ModelWorker(pre), pre.cfg, True), engine_for(ModelWorker(dec), dec.cfg, False)
    router = DisaggRouter([prefill], [decode])
    got = agent_loop(router)
    # turn t resumes at its previous prompt's last page boundary (150 -> 128, 340 -> 256)
    assert [c for _, c in got] == [0, 128, 256] and prefill.load()["prefix_hits"] == 2
    router.stop()
