"""The engine end to end in-process: batching, sampling, preemption, pages, errors."""

from __future__ import annotations

import threading

import pytest
import torch

from cluster.backends.local import LocalWorkerGroup
from cluster.engine.engine import Engine, EngineConfig
from cluster.engine.requests import GenerateRequest, QueueFullError, RequestError, RequestOutput
from encoding.tokenizer import load_tokenizer
from workers.kv_cache import KVCacheManager, KVLayout
from workers.score import score
from workers.step import SamplingParams
from workers.weights import load_model
from workers.worker import ModelWorker


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def make_engine(model, tokenizer, num_pages=4096, page_size=128, worker=None, **cfg) -> Engine:
    kv = KVCacheManager(KVLayout.for_model(model.cfg, 4), num_pages=num_pages, page_size=page_size)
    return Engine(LocalWorkerGroup([worker or ModelWorker(model)]), tokenizer, kv, EngineConfig(**cfg)).start()


class Collector:
    def __init__(self) -> None:
        self.outputs: dict[str, list[RequestOutput]] = {}
        self.done = threading.Condition()

    def sink(self, uid: str):
        def push(out: RequestOutput) -> None:
            with self.done:
                self.outputs.setdefault(uid, []).append(out)
                self.done.notify_all()
        return push

    def wait(self, uids, timeout=120.0) -> None:
        with self.done:
            ok = self.done.wait_for(lambda: all(self.finished(u) for u in uids), timeout)
        assert ok, {u: len(self.outputs.get(u, [])) for u in uids}

    def finished(self, uid: str) -> bool:
        outs = self.outputs.get(uid)
        return bool(outs) and outs[-1].finished

    def tokens(self, uid: str) -> list[int]:
        return [t for o in self.outputs[uid] for t in o.token_ids]

    def text(self, uid: str) -> str:
        return "".join(o.text for o in self.outputs[uid])

    def final(self, uid: str) -> RequestOutput:
        return self.outputs[uid][-1]


def run(engine: Engine, requests: list[GenerateRequest]) -> Collector:
    col = Collector()
    for r in requests:
        engine.submit(r, col.sink(r.uid))
    col.wait([r.uid for r in requests])
    return col


def prompts(n: int, length: int = 20, seed: int = 0) -> list[tuple[int, ...]]:
    gen = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(3, 120000, (length + 3 * i,), generator=gen).tolist()) for i in range(n)]


def greedy_chain(model, prompt, n) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(score(model, [torch.tensor(ids)], None)[0][-1].argmax()))
    return ids[len(prompt):]


def test_greedy_batch_equals_greedy_chain(model, tokenizer):
    engine = make_engine(model, tokenizer, max_batch_tokens=24)  # prompts are chunked across steps
    ps = prompts(6)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    col = run(engine, [GenerateRequest(f"g{i}", p, greedy) for i, p in enumerate(ps)])
    for i in (0, 5):
        assert col.tokens(f"g{i}") == greedy_chain(model, ps[i], 8)
    assert all(col.final(f"g{i}").finish_reason == "length" for i in range(6))
    assert engine.wait_idle() and engine.kv.used_pages == 0
    engine.stop()


def test_seeded_request_is_independent_of_the_batch(model, tokenizer):
    engine = make_engine(model, tokenizer)
    ps = prompts(5, seed=1)
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=42, ignore_eos=True)
    alone = run(engine, [GenerateRequest("solo", ps[0], params)]).tokens("solo")
    others = [GenerateRequest(f"o{i}", p, SamplingParams(max_tokens=12, seed=i)) for i, p in enumerate(ps[1:])]
    col = run(engine, [*others[:2], GenerateRequest("mixed", ps[0], params), *others[2:]])
    assert col.tokens("mixed") == alone
    different = run(engine, [GenerateRequest("s43", ps[0], SamplingParams(max_tokens=10, seed=43, ignore_eos=True))])
    assert different.tokens("s43") != alone
    engine.stop()


def test_preemption_recomputes_without_a_wrong_token(model, tokenizer):
    ps = prompts(4, length=60, seed=2)
    reqs = [GenerateRequest(f"p{i}", p, SamplingParams(max_tokens=40, temperature=0.7, seed=i, ignore_eos=True))
            for i, p in enumerate(ps)]  # fmt: skip
    roomy = make_engine(model, tokenizer)
    ref = run(roomy, reqs)
    roomy.stop()
    # 16-token pages in the accounting (the worker's pool keeps its 128-token pages; only
    # the manager decides who may grow): room for the four prompts, not for their decodes
    probe = make_engine(model, tokenizer, page_size=16)
    pages = sum(probe.kv.pages_for(len(p) + 1) for p in ps) + 4
    assert sum(probe.kv.pages_for(len(p) + 40) for p in ps) > pages
    probe.stop()
    tight = make_engine(model, tokenizer, num_pages=pages, page_size=16)
    col = run(tight, reqs)
    for r in reqs:
        assert col.tokens(r.uid) == ref.tokens(r.uid)
    assert tight.wait_idle()
    assert tight.stats.preemptions > 0
    assert tight.kv.used_pages == 0 and tight.worker.num_states() == 0
    tight.stop()


def test_stop_string_is_not_emitted(model, tokenizer):
    engine = make_engine(model, tokenizer)
    p = prompts(1, seed=3)[0]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    free_text = run(engine, [GenerateRequest("free", p, greedy)]).text("free")
    stop = free_text[len(free_text) // 2 : len(free_text) // 2 + 3]
    assert stop.strip(), free_text
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=(stop,))
    col = run(engine, [GenerateRequest("stopped", p, params)])
    assert col.text("stopped") == free_text[: free_text.index(stop)]
    assert col.final("stopped").finish_reason == "stop"
    engine.stop()


def test_logprobs_match_the_model(model, tokenizer):
    engine = make_engine(model, tokenizer)
    p = prompts(1, seed=4)[0]
    col = run(engine, [GenerateRequest("lp", p, SamplingParams(max_tokens=3, temperature=0.0, logprobs=3))])
    lps = [lp for o in col.outputs["lp"] for lp in o.logprobs]
    assert len(lps) == 3
    ref = score(model, [torch.tensor(list(p) + col.tokens("lp"))], None)[0].log_softmax(-1)
    for i, lp in enumerate(lps):
        row = ref[len(p) - 1 + i]
        assert lp.token_id == int(row.argmax())
        assert lp.logprob == pytest.approx(row.max().item(), abs=1e-4)
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()
    engine.stop()


def test_refusals(model, tokenizer):
    engine = make_engine(model, tokenizer, num_pages=10, page_size=64, max_model_len=1000, max_waiting=1)
    with pytest.raises(RequestError, match="max_tokens"):
        engine.submit(GenerateRequest("big", (1,) * 900, SamplingParams(max_tokens=200)), lambda o: None)
    with pytest.raises(RequestError, match="KV pages"):
        engine.submit(GenerateRequest("kv", (1,) * 600, SamplingParams(max_tokens=100)), lambda o: None)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.submit(GenerateRequest("voc", (1, 129280), SamplingParams()), lambda o: None)
    with pytest.raises(RequestError, match="temperature"):
        engine.submit(GenerateRequest("t", (1,), SamplingParams(temperature=-1)), lambda o: None)
    engine.stop()
    engine = make_engine(model, tokenizer, max_waiting=1)
    with engine._cv:  # hold the loop so the queue cannot drain between the two submits
        engine.submit(GenerateRequest("q1", (1, 2), SamplingParams(max_tokens=2)), lambda o: None)
        with pytest.raises(QueueFullError):
            engine.submit(GenerateRequest("q2", (1, 2), SamplingParams(max_tokens=2)), lambda o: None)
    engine.stop()


def test_abort_and_failure_free_everything(model, tokenizer):
    class Flaky(ModelWorker):
        fail = False

        def execute(self, plan):
            if self.fail and plan.work:
                raise RuntimeError("boom")
            return super().execute(plan)

    worker = Flaky(model)
    engine = make_engine(model, tokenizer, worker=worker)
    col = Collector()
    long = SamplingParams(max_tokens=2000, ignore_eos=True)
    engine.submit(GenerateRequest("a", prompts(1)[0], long), col.sink("a"))
    engine.submit(GenerateRequest("b", prompts(1, seed=9)[0], long), col.sink("b"))
    assert engine.abort("a") and not engine.abort("nope")
    col.wait(["a"])
    assert col.final("a").finish_reason == "abort"
    worker.fail = True
    col.wait(["b"])
    assert col.final("b").finish_reason == "error" and "boom" in col.final("b").error
    worker.fail = False
    assert engine.wait_idle() and engine.kv.used_pages == 0
    after = run(engine, [GenerateRequest("c", prompts(1)[0], SamplingParams(max_tokens=3))])
    assert after.final("c").finish_reason in ("length", "stop")
    engine.stop()
