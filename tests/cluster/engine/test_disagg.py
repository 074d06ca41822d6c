"""Prefill and decode instances with KV handoff.

Oracles: a colocated engine on the same checkpoint (greedy and seeded tokens must be
equal, prompts from 1 token to several pages), and a sequence continued from an imported
state against the sequence itself.
"""

from __future__ import annotations

import re
import urllib.request
from dataclasses import replace

import pytest
import torch

from cluster.backends.local import LocalWorkerGroup
from cluster.engine.engine import Engine, EngineConfig
from cluster.engine.pool_router import DisaggRouter
from cluster.engine.requests import GenerateRequest
from encoding.tokenizer import load_tokenizer
from tests.cluster.engine.test_engine import prompts, run
from workers.kv_cache import KVCacheManager, KVLayout
from workers.model import Batch
from workers.step import SamplingParams
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
    group = worker if isinstance(worker, LocalWorkerGroup) else LocalWorkerGroup([worker])
    return Engine(group, load_tokenizer(), kv, EngineConfig(max_batch_tokens=256)).start()


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
    groups = [LocalWorkerGroup.load(tiny_checkpoint, 2, dtype=torch.float32, simulate_quant=False) for _ in range(2)]
    router = DisaggRouter([engine(groups[0], groups[0].model_config)], [engine(groups[1], groups[1].model_config)])
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
    handoff, GetServerInfo shows both pools, greedy output equals the colocated engine's
    (a 300-token prompt is prefilled context-parallel over the prefill pool's 2 workers)."""
    import yaml

    from tests.cluster.gateway.test_server import Server, free_port, generate, pb

    raw = yaml.safe_load(open("manifests/disagg-local.yaml"))
    raw["model"] = {"checkpoint": str(tiny_checkpoint), "dtype": "float32", "simulate_quant": False}
    raw["gateway"]["port"], raw["gateway"]["metrics_port"] = 0, free_port()
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(raw))
    server = Server("-m", str(tmp_path / "m.yaml"))
    try:
        m = model_of(tiny_checkpoint)
        e = engine(ModelWorker(m), m.cfg)
        for ids in (list(prompts(1, length=40, seed=44)[0]), list(prompts(1, length=300, seed=45)[0])):
            out = list(server.stub.Generate(generate(ids, max_tokens=10, temperature=0.0, ignore_eos=True)))
            got = [t for r in out if r.WhichOneof("kind") == "chunk" for t in r.chunk.token_ids]
            assert out[-1].finish.finish_reason == "length" and len(got) == 10
            ref = run(e, [GenerateRequest("r", tuple(ids), SamplingParams(max_tokens=10, temperature=0.0,
                                                                          ignore_eos=True))]).tokens("r")  # fmt: skip
            assert got == ref, len(ids)
        e.stop()
        port = int(server.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)").group(1))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        names = ("dsv4_kv_handoffs", "dsv4_kv_handoff_bytes", "dsv4_kv_handoff_recomputed")
        counters = [float(re.search(rf"^{name}_total (\S+)", text, re.M).group(1)) for name in names]
        states = []  # what the two prompts' states hold, from a local model's pool
        for n, seed in ((40, 44), (300, 45)):
            st = m.new_state()
            m(Batch.build([torch.tensor(prompts(1, length=n, seed=seed)[0])], [st]), [st])
            states.append(m.kv.export(st).nbytes())
            st.free()
        assert counters == [2, sum(states), 0], counters
        info = server.stub.GetServerInfo(pb.GetServerInfoRequest())
        pools = {p.name: p for p in info.pools}
        assert (pools["prefill"].role, pools["decode"].role) == ("prefill", "decode")
        assert [w.rank for w in pools["decode"].workers] == [0, 1] and pools["decode"].num_instances == 1
        assert [w.rank for w in pools["prefill"].workers] == [0, 1]
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
    from cluster.engine.requests import EngineUnavailableError

    real, calls = getattr(worker, method), {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == after + 1:
            raise EngineUnavailableError(f"{method}: worker lost")
        return real(*args, **kwargs)

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


def test_a_failed_export_is_released_on_the_rank_holding_it(tiny_checkpoint):
    """An export that fails before the state left its rank: the engine's release still
    reaches that rank (no state or page stays behind on the prefill side)."""
    groups = [LocalWorkerGroup.load(tiny_checkpoint, 2, dtype=torch.float32, simulate_quant=False) for _ in range(2)]
    for worker in groups[0].workers:
        _lose_once(worker, "export")
    router = DisaggRouter([engine(groups[0], groups[0].model_config)], [engine(groups[1], groups[1].model_config)],
                          on_failure="fail")  # fmt: skip
    col = run(router, [requests()[4]])
    assert col.final(requests()[4].uid).unavailable
    assert router.wait_idle(timeout=10) and groups[0].num_states() == 0 and not groups[0].owner
    assert all(w.model.kv.used_pages == 0 for g in groups for w in g.workers)
    router.stop()


def _hand_over_once(worker, corrupt):
    """Make the first state `worker` exports arrive as `corrupt(state)` (the real one is released)."""
    real, calls = worker.export, {"n": 0}

    def export(uid, timeout=None):
        calls["n"] += 1
        state = real(uid, timeout=timeout)
        return corrupt(state) if calls["n"] == 1 else state

    worker.export = export


def _idle_and_empty(router, *models) -> None:
    assert router.wait_idle()
    for e in router.engines:
        assert e.load()["kv_pages_used"] == 0 and e.kv.used_pages == 0 and e.worker.num_states() == 0
    assert all(m.kv.used_pages == 0 for m in models)


@pytest.mark.parametrize(("policy", "state"), [("recompute", "a layer short"), ("fail", "missing")])
def test_a_state_the_decode_side_cannot_import_is_refused(tiny_checkpoint, colocated, policy, state):
    """A handed-off state that does not fit the decode instance's KV pool (another model, a
    truncated or lost object) is refused before anything is reserved; the policy applies."""
    pre, dec = model_of(tiny_checkpoint), model_of(tiny_checkpoint)
    prefill, decode = engine(ModelWorker(pre), pre.cfg), engine(ModelWorker(dec), dec.cfg)
    if state == "missing":
        _hand_over_once(prefill.worker, lambda s: None)
    else:
        _hand_over_once(prefill.worker, lambda s: replace(s, slot_state=s.slot_state[:-1], entries=s.entries[:-1]))
    router = DisaggRouter([prefill], [decode], on_failure=policy)
    uid = "s128" if policy == "recompute" else "g5"
    col = run(router, [r for r in requests() if r.uid == uid])
    if policy == "recompute":
        assert col.tokens(uid) == colocated[uid] and col.final(uid).finish_reason == "length"
        assert router.recomputed == 1 and router.handoffs == 1  # the recompute's handoff went through
    else:
        final = col.final(uid)
        assert final.unavailable and final.finish_reason == "error" and "cannot be imported" in final.error
        assert len(col.tokens(uid)) == 1 and router.handoffs == 0
    prompt_len = len(next(r for r in requests() if r.uid == uid).prompt_ids)
    assert decode.stats.tokens_in == (prompt_len if policy == "recompute" else 0)  # the refused one never got in
    _idle_and_empty(router, pre, dec)
    router.stop()


def _flip_a_byte(state):
    """The state with one byte of its last layer's entries flipped (shapes intact: only the
    checksum can tell)."""
    layer = next(i for i in reversed(range(len(state.entries))) if state.entries[i])
    flat = state.entries[layer][0].view(-1).view(torch.uint8)
    flat[flat.numel() // 2] ^= 0x5A
    return state


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_a_state_corrupted_on_the_way_is_never_decoded(tiny_checkpoint, colocated, policy):
    """Every shipped layer carries a checksum that the decode worker verifies before the
    import (vLLM #52276 decoded a failed transfer into HTTP 200 garbage): a flipped byte
    fails the handoff, and the policy recomputes the request (same tokens) or fails it."""
    pre, dec = model_of(tiny_checkpoint), model_of(tiny_checkpoint)
    prefill, decode = engine(ModelWorker(pre), pre.cfg), engine(ModelWorker(dec), dec.cfg)
    _hand_over_once(prefill.worker, _flip_a_byte)
    router = DisaggRouter([prefill], [decode], on_failure=policy)
    uid = "s128" if policy == "recompute" else "g5"
    col = run(router, [r for r in requests() if r.uid == uid])
    final = col.final(uid)
    if policy == "recompute":
        assert col.tokens(uid) == colocated[uid] and final.finish_reason == "length" and router.recomputed == 1
    else:
        assert final.unavailable and final.finish_reason == "error" and "checksum" in final.error, final
        assert len(col.tokens(uid)) == 1
    _idle_and_empty(router, pre, dec)
    router.stop()


def test_an_import_failing_in_the_decode_step_frees_what_it_reserved(tiny_checkpoint, colocated):
    """The decode worker fails to import a state inside its step (after the engine reserved
    pages for it): the engine frees them, the request counts as lost and is recomputed."""
    pre, dec = model_of(tiny_checkpoint), model_of(tiny_checkpoint)
    prefill, decode = engine(ModelWorker(pre), pre.cfg), engine(ModelWorker(dec), dec.cfg)
    real, calls = dec.kv.import_, {"n": 0}

    def import_once_broken(exp):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("the state's tensors could not be read")
        return real(exp)

    dec.kv.import_ = import_once_broken
    router = DisaggRouter([prefill], [decode], on_failure="recompute")
    col = run(router, [r for r in requests() if r.uid == "g300"])
    assert col.tokens("g300") == colocated["g300"] and col.final("g300").finish_reason == "length"
    assert calls["n"] == 2 and router.recomputed == 1
    _idle_and_empty(router, pre, dec)
    router.stop()


def test_state_spec_names_what_does_not_fit(tiny_checkpoint):
    m = model_of(tiny_checkpoint)
    worker = ModelWorker(m)
    st = m.new_state()
    m(Batch.build([torch.randint(3, 120000, (300,))], [st]), [st])
    exp = m.kv.export(st)
    st.free()
    assert worker.check_import(exp) is None
    assert "got NoneType" in worker.check_import(None)
    assert "num_tokens" in worker.check_import(replace(exp, num_tokens=-1))
    assert "layer 1: " in worker.check_import(replace(exp, num_tokens=exp.num_tokens + 128))  # entries short
    as_bf16 = [[t.to(torch.bfloat16) for t in layer] for layer in exp.slot_state]
    assert "bfloat16" in worker.check_import(replace(exp, slot_state=as_bf16))
    assert "layers" in worker.check_import(replace(exp, entries=exp.entries[:-1]))


def test_prefill_pool_prefix_cache_reaches_the_client(tiny_checkpoint):
    """A prefill instance with the prefix cache: later turns resume there, and the usage
    the decode instance sends at the end reports those cached tokens."""
    from tests.cluster.engine.test_prefix_cache import agent_loop, engine_for

    pre, dec = model_of(tiny_checkpoint), model_of(tiny_checkpoint)
    prefill, decode = engine_for(ModelWorker(pre), pre.cfg, True), engine_for(ModelWorker(dec), dec.cfg, False)
    router = DisaggRouter([prefill], [decode])
    got = agent_loop(router)
    # turn t resumes at its previous prompt's last page boundary (150 -> 128, 340 -> 256)
    assert [c for _, c in got] == [0, 128, 256] and prefill.load()["prefix_hits"] == 2
    router.stop()
