"""The collective KV handoff carrier (workers/handoff.py, issue #6), between two workers of
this process over a real two-rank gloo group (the same code runs nccl between GPU workers).

The prefill worker keeps each layer of the exported state as its last prompt chunk passes
it; the decode worker pulls them through the holder's endpoint (here a thread, in Ray an
actor's concurrency group). Oracles: the state and the next tokens of a third worker that
ran the same prompt and never handed anything off.
"""

from __future__ import annotations

import time

import pytest
import torch

from workers.handoff import Carrier, CollectiveCarrier, LocalEndpoint, PulledState
from workers.step import SamplingParams, SeqWork, StepPlan
from workers.weights import load_model
from workers.worker import ModelWorker

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)
SEEDED = SamplingParams(max_tokens=4, temperature=0.9, top_k=20, seed=11)


@pytest.fixture(scope="module")
def workers(tiny_checkpoint):
    """(prefill, decode, reference): the first two with collective carriers."""

    def worker() -> ModelWorker:
        return ModelWorker(load_model(tiny_checkpoint, dtype=torch.float32, simulate_quant=False, progress=False))

    prefill, decode, reference = worker(), worker(), worker()
    prefill.carrier = CollectiveCarrier("cpu", timeout_s=20)
    prefill.carrier.endpoint = LocalEndpoint(prefill.carrier)
    decode.carrier = CollectiveCarrier("cpu", timeout_s=20)
    return prefill, decode, reference


def prompt(n: int, seed: int) -> tuple[int, ...]:
    return tuple(torch.randint(3, 120000, (n,), generator=torch.Generator().manual_seed(seed)).tolist())


def prefill(worker: ModelWorker, uid: str, ids: tuple[int, ...], params: SamplingParams, export: bool) -> int:
    """Two chunks (the last one exported layer by layer when `export`); the sampled token."""
    cut = len(ids) // 2
    worker.execute(StepPlan(work=(SeqWork(uid, ids[:cut], 0, False),), sampling={uid: params}))
    plan = StepPlan(work=(SeqWork(uid, ids[cut:], cut, True),), exports=frozenset({uid} if export else ()))
    return worker.execute(plan).tokens[uid]


def decode_steps(worker: ModelWorker, uid: str, first: int, at: int, steps: int, imports=None) -> list[int]:
    out, token = [], first
    for i in range(steps):
        plan = StepPlan(work=(SeqWork(uid, (token,), at + i, True),), num_generated={uid: 1 + i},
                        imports=imports if i == 0 else {})  # fmt: skip
        result = worker.execute(plan)
        assert not result.failed, result.failed
        token = result.tokens[uid]
        out.append(token)
    return out


@pytest.mark.parametrize(("n", "params"), [(1, GREEDY), (300, GREEDY), (263, SEEDED)])
def test_pulled_state_equals_the_state_that_stayed(workers, n, params):
    pre, dec, ref = workers
    ids = prompt(n, seed=n)
    if n == 1:  # a single token: one chunk
        pre.execute(StepPlan(work=(SeqWork("a", ids, 0, True),), sampling={"a": params}, exports=frozenset({"a"})))
        ref.execute(StepPlan(work=(SeqWork("a", ids, 0, True),), sampling={"a": params}))
        first = 5
    else:
        first = prefill(pre, "a", ids, params, export=True)
        assert prefill(ref, "a", ids, params, export=False) == first
    ticket = pre.export("a")
    assert isinstance(ticket, PulledState) and pre.num_states() == 0
    kept = ref.model.kv.export(ref.states["a"])
    assert ticket.nbytes() == kept.nbytes() and ticket.num_tokens == n

    dec.params["a"], dec.seeds["a"] = params, ref.seeds["a"]  # as the engine's plan would carry them
    pulled = dec.carrier.fetch(ticket, 20)
    for got, want in zip([*pulled.slot_state, *pulled.entries], [*kept.slot_state, *kept.entries], strict=True):
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    ticket = _again(pre, ref, "a", n)  # the fetch above consumed the held copy: hand it off once more
    tokens = decode_steps(dec, "a", first, n, 3, imports={"a": ticket})
    assert tokens == decode_steps(ref, "a", first, n, 3)
    for w in (dec, ref):
        w.release("a")
    assert len(dec.carrier.peers) == 1  # one channel per pair, reused


def _again(pre: ModelWorker, ref: ModelWorker, uid: str, n: int) -> PulledState:
    """The reference's state, imported into the prefill worker and exported from it again."""
    st = pre.model.kv.import_(ref.model.kv.export(ref.states[uid]))
    pre.states[uid] = st
    pre.params[uid], pre.seeds[uid] = ref.params[uid], ref.seeds[uid]
    return pre.export(uid)


def test_a_state_pulled_twice_released_or_expired_fails_alone(workers):
    pre, dec, ref = workers
    ids = prompt(40, seed=3)
    first = prefill(pre, "b", ids, GREEDY, export=True)
    ticket = pre.export("b")
    dec.carrier.fetch(ticket, 20)
    free_before = len(dec.model.kv._free_pages)
    plan = StepPlan(work=(SeqWork("b", (first,), 40, True),), sampling={"b": GREEDY}, imports={"b": ticket})
    result = dec.execute(plan)
    assert result.tokens == {} and "no longer holds the state" in result.failed["b"]
    assert dec.num_states() == 0 and len(dec.model.kv._free_pages) == free_before

    pre.carrier.hold_s = 0.0  # the next ticket drops every state not pulled in time
    prefill(pre, "c", ids, GREEDY, export=True)
    stale = pre.export("c")
    prefill(pre, "d", ids, GREEDY, export=True)
    fresh = pre.export("d")
    assert not pre.carrier.has(stale.key) and pre.carrier.has(fresh.key)
    pre.carrier.hold_s = 300.0
    pre.carrier.held.clear()


def test_a_dead_holder_fails_the_pull_and_closes_the_channel(workers):
    pre, dec, _ = workers
    ids = prompt(30, seed=4)
    prefill(pre, "e", ids, GREEDY, export=True)
    ticket = pre.export("e")

    class Dead:
        id = ticket.source.id

        def call(self, name, *args):
            class Reply:
                def done(self):
                    return True

                def result(self, timeout=None):
                    raise ConnectionError("actor died")

            return Reply()

    ticket.source = Dead()
    dec.carrier.peers.setdefault(Dead.id, "kv-handoff-stale")
    result = dec.execute(StepPlan(work=(SeqWork("e", (7,), 30, True),), sampling={"e": GREEDY}, imports={"e": ticket}))
    assert "ConnectionError: actor died" in result.failed["e"] and dec.num_states() == 0
    assert Dead.id not in dec.carrier.peers  # the next pull from that holder opens a new channel
    pre.carrier.held.clear()


def test_a_pulled_state_needs_a_collective_carrier_on_the_decode_side(workers, tiny_checkpoint):
    pre, _, _ = workers
    prefill(pre, "f", prompt(20, seed=5), GREEDY, export=True)
    ticket = pre.export("f")
    plain = ModelWorker(load_model(tiny_checkpoint, dtype=torch.float32, simulate_quant=False, progress=False))
    assert type(plain.carrier) is Carrier
    result = plain.execute(StepPlan(work=(SeqWork("f", (7,), 20, True),), sampling={"f": GREEDY},
                                    imports={"f": ticket}))  # fmt: skip
    assert "handoff transport `collective`" in result.failed["f"] and plain.num_states() == 0
    pre.carrier.held.clear()


def _dropped(carrier: CollectiveCarrier, key: str) -> bool:
    """Whether the holder let go of `key` (a discard reaches it on its endpoint's thread)."""
    deadline = time.monotonic() + 10
    while carrier.has(key) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not carrier.has(key)


def test_a_refused_or_abandoned_ticket_is_freed_by_its_holder_at_once(workers):
    """A ticket whose layout the decode worker refuses, and one whose request ends while it
    waits for room on the decode instance, are discarded: the holder drops the layers it
    keeps on its device now, not when they expire."""
    from cluster.engine.scheduler import SchedRequest, Scheduler
    from workers.kv_cache import KVCacheManager, KVLayout

    pre, dec, _ = workers
    prefill(pre, "g", prompt(40, seed=6), GREEDY, export=True)
    ticket = pre.export("g")
    ticket.layout = ticket.layout[:-1]  # as another model's state would look
    result = dec.execute(StepPlan(work=(SeqWork("g", (7,), 40, True),), sampling={"g": GREEDY}, imports={"g": ticket}))
    assert "layers of state" in result.failed["g"] and dec.num_states() == 0
    assert _dropped(pre.carrier, ticket.key)

    prefill(pre, "h", prompt(40, seed=7), GREEDY, export=True)
    ticket = pre.export("h")
    sched = Scheduler(KVCacheManager(KVLayout.for_model(pre.model.cfg, 4), num_pages=64), 256, 8)
    sched.add(SchedRequest("h", list(prompt(40, seed=7)), GREEDY, output=[7], imported=ticket))
    assert pre.carrier.has(ticket.key)
    sched.remove("h")  # aborted (or failed) while waiting for admission
    assert _dropped(pre.carrier, ticket.key)


def test_a_failed_import_keeps_no_snapshot(workers):
    """A step that planned to keep the prefix of a request whose import failed runs on and
    keeps nothing for it (the engine forgets the key)."""
    pre, dec, _ = workers
    prefill(pre, "i", prompt(127, seed=8), GREEDY, export=True)
    ticket = pre.export("i")
    dec.carrier.fetch(ticket, 20)  # pulled once already: the real pull below finds nothing
    plan = StepPlan(work=(SeqWork("i", (7,), 127, True),), sampling={"i": GREEDY}, imports={"i": ticket},
                    snapshots={"i": "page-key"})  # fmt: skip
    result = dec.execute(plan)
    assert set(result.failed) == {"i"} and "page-key" not in dec.prefixes and dec.num_states() == 0


def test_messages_keep_every_tensor_aligned():
    """A layer's tensors go back to back in one message, each padded to 16 bytes, so odd
    sizes of mixed dtypes come back equal (a view of a misaligned offset would fail)."""
    from workers.handoff import _pack, _padded_sizes, _unpack, signature

    gen = torch.Generator().manual_seed(9)
    slots = [torch.randn(3, generator=gen).bfloat16(), torch.randn(5, 1, generator=gen)]
    entries = [torch.randint(0, 9, (1,), generator=gen), torch.randn(0, 4), torch.randn(2, 3, generator=gen)]
    piece = (slots, entries)
    tensors = [*piece[0], *piece[1]]
    sig = signature(tensors)
    flat = _pack(piece)
    assert flat.dtype == torch.uint8 and flat.numel() == sum(_padded_sizes(sig)) == 16 + 32 + 16 + 0 + 32
    back = _unpack(flat.clone(), sig, _padded_sizes(sig))
    assert all(b.dtype == t.dtype and torch.equal(b, t) for b, t in zip(back, tensors, strict=True))
