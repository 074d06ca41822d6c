"""The scheduler's side of context-parallel prefill: which chunks it marks to be split over
the instance's ranks, and the KV pages it charges while every rank holds a replica of the
request's state (oracle: `pages_for` arithmetic times the replicas held)."""

from __future__ import annotations

from cluster.engine.scheduler import SchedRequest, Scheduler
from workers.kv_cache import KVCacheManager, KVLayout
from workers.presets import preset_config
from workers.step import SamplingParams


def _scheduler(num_pages: int, ranks: int = 2, min_tokens: int = 128) -> tuple[Scheduler, KVCacheManager]:
    kv = KVCacheManager(KVLayout.for_model(preset_config("tiny"), elem_bytes=4), num_pages=num_pages)
    return Scheduler(kv, max_batch_tokens=256, max_running=8, cp_ranks=ranks, cp_min_tokens=min_tokens), kv


def _request(uid: str, n: int) -> SchedRequest:
    return SchedRequest(uid, list(range(3, 3 + n)), SamplingParams(max_tokens=4))


def test_a_long_new_prompt_is_split_and_charged_once_per_replica():
    s, kv = _scheduler(1000)
    req = _request("a", 300)
    s.add(req)
    plan = s.schedule()
    assert [(w.context_parallel, len(w.token_ids)) for w in plan.work] == [(True, 256)]
    assert kv.used_pages == 2 * kv.pages_for(256)
    plan = s.schedule()  # the 44-token tail: still split
    assert [(w.context_parallel, len(w.token_ids)) for w in plan.work] == [(True, 44)]
    assert kv.used_pages == 2 * kv.pages_for(300)
    req.output.append(7)  # its first token came back
    plan = s.schedule()  # decode: its owner alone, the other replica's pages come back
    assert [w.context_parallel for w in plan.work] == [False] and kv.used_pages == kv.pages_for(301)
    s.remove("a")
    assert kv.used_pages == 0


def test_short_cached_or_unfitting_prompts_are_not_split():
    s, kv = _scheduler(1000)
    s.add(_request("short", 100))
    assert [w.context_parallel for w in s.schedule().work] == [False] and kv.used_pages == kv.pages_for(100)
    one_rank, kv1 = _scheduler(1000, ranks=1)
    one_rank.add(_request("a", 300))
    assert not one_rank.schedule().work[0].context_parallel and kv1.used_pages == kv1.pages_for(256)
    # the prompt fits once but not once per rank: it still runs, on one rank
    tight, kv2 = _scheduler(KVCacheManager(kv.layout, 1).pages_for(301) + 1)
    tight.add(_request("a", 300))
    plan = tight.schedule()
    assert [w.context_parallel for w in plan.work] == [False] and kv2.used_pages == kv2.pages_for(256)


def test_a_preempted_split_prompt_gives_every_replica_back():
    s, kv = _scheduler(1000)
    s.add(_request("a", 300))
    s.schedule()
    assert kv.used_pages == 2 * kv.pages_for(256)
    s._preempt(s.running[0])
    assert kv.used_pages == 0 and kv.holders() == []
    plan = s.schedule()  # readmitted from scratch: split again
    assert plan.finished == ("a",) and plan.work[0].context_parallel and plan.work[0].pos0 == 0
