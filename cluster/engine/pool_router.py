"""The pool router: admission and placement of requests over a pool's engine instances by
load, retry on a healthy instance, and the pool's combined load (docs/architecture.md §4).

To the gateway it looks like one engine (`submit`, `abort`, `load`, ...). Each new request
goes to the instance with the lowest load score: running + waiting requests over the
instance's batch size, plus the fraction of its KV pages in use. A request whose instance
lost its workers before the request produced a token is resubmitted once to another
instance; one that already streamed tokens ends UNAVAILABLE (its client saw text that a
recompute elsewhere would repeat).

It runs in the gateway's process beside the instances' engine loops (the workers are the
Ray actors); with one instance it is a pass-through.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from cluster.engine.engine import Engine, Sink
from cluster.engine.requests import EngineUnavailableError, GenerateRequest, RequestOutput
from router.stats import merge
from workers import faults
from workers.step import Prefilled

log = logging.getLogger("dsv4.router")
UNHEALTHY = 1000.0  # added to the load score of an instance that is not serving


@dataclass
class _Placed:
    instance: int
    request: GenerateRequest
    sink: Sink
    streamed: bool = False
    retried: bool = False
    emitted: int = 0  # tokens the client has been sent
    skip: int = 0  # tokens of a recompute to swallow (the client has them already)


class InstanceRouter:
    """Places requests over `engines` (instances of one colocated pool) by load."""

    def __init__(self, engines: list[Engine], pool: str = "colocated") -> None:
        if not engines:
            raise ValueError("a pool needs at least one instance")
        self.engines, self.pool = engines, pool
        first = engines[0]
        self.tokenizer, self.vocab_size, self.eos_id, self.config = (
            first.tokenizer, first.vocab_size, first.eos_id, first.config
        )  # fmt: skip
        self._placed: dict[str, _Placed] = {}
        self._lock = threading.Lock()
        self.retries = 0

    @property
    def model_config(self):
        return self.engines[0].model_config

    @property
    def page_size(self) -> int:
        return self.engines[0].page_size

    # -- placement ------------------------------------------------------------------------
    def score(self, i: int) -> float:
        """Lower is emptier: requests per batch slot plus the KV fraction in use; an instance
        whose workers are lost or rebuilding comes last (it takes work only when all are)."""
        engine, load = self.engines[i], self.engines[i].load()
        busy = (load["running"] + load["waiting"]) / max(1, engine.config.max_running)
        kv = load["kv_pages_used"] / max(1, load["kv_pages_total"])
        return busy + kv + UNHEALTHY * load.get("instances_unhealthy", 0)

    def _pick(self, exclude: int | None = None) -> int:
        candidates = [i for i in range(len(self.engines)) if i != exclude]
        return min(candidates, key=lambda i: (self.score(i), i))

    def submit(self, request: GenerateRequest, sink: Sink) -> None:
        """Queue `request` on the emptiest instance; errors as Engine.submit."""
        faults.hit("router.place")
        placed = _Placed(self._pick(), request, sink)
        with self._lock:
            self._placed[request.uid] = placed
        try:
            self.engines[placed.instance].submit(request, lambda out: self._on_output(placed, out))
        except BaseException:
            with self._lock:
                self._placed.pop(request.uid, None)
            raise

    def _on_output(self, placed: _Placed, out: RequestOutput) -> None:
        uid = placed.request.uid
        if out.unavailable and not placed.streamed and not placed.retried and len(self.engines) > 1:
            placed.retried, placed.instance = True, self._pick(exclude=placed.instance)
            try:
                self.engines[placed.instance].submit(placed.request, lambda o: self._on_output(placed, o))
                self.retries += 1
                log.warning("%s: instance lost its workers; retried on instance %d", uid, placed.instance)
                return
            except EngineUnavailableError as e:  # the other instance cannot take it either
                log.error("%s: retry failed: %s", uid, e)
        placed.streamed = placed.streamed or bool(out.token_ids)
        if out.finish_reason is not None:
            with self._lock:
                self._placed.pop(uid, None)
        placed.sink(out)

    def abort(self, uid: str) -> bool:
        with self._lock:
            placed = self._placed.get(uid)
        return placed is not None and self.engines[placed.instance].abort(uid)

    # -- the pool -----------------------------------------------------------------------------
    def load(self) -> dict[str, int]:
        """The instances' loads summed, plus `instances`."""
        total: dict[str, int] = {"instances": len(self.engines)}  # (+ instances_unhealthy, summed)
        for engine in self.engines:
            for key, value in engine.load().items():
                total[key] = total.get(key, 0) + value
        return total

    def routing_totals(self):
        """Every instance's routing stats since it started, summed (the EPLB input); asked of
        the instances at once (each waits at most a short timeout on busy workers)."""
        if len(self.engines) == 1:
            return self.engines[0].routing_totals()
        with ThreadPoolExecutor(len(self.engines), thread_name_prefix="dsv4-stats") as pool:
            return merge(pool.map(lambda engine: engine.routing_totals(), self.engines))

    def pools(self) -> list[tuple[str, str, list[Engine]]]:
        """(name, role, instances) of each pool this router places requests on."""
        return [(self.pool, "colocated", list(self.engines))]

    def instance_loads(self) -> list[dict[str, int]]:
        return [engine.load() for engine in self.engines]

    def wait_idle(self, timeout: float = 30.0) -> bool:
        return all(engine.wait_idle(timeout) for engine in self.engines)

    def stop(self, drain: bool = True, timeout: float = 60.0) -> None:
        threads = [threading.Thread(target=e.stop, args=(drain, timeout)) for e in self.engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


class DisaggRouter(InstanceRouter):
    """Prefill and decode pools (docs/architecture.md §2): each new request goes to the emptiest prefill
    instance, which runs its prompt and samples the first token; its KV state then moves
    to the emptiest decode instance, which decodes the rest into the same stream.

    The handoff carries the whole V4 state (window and compressor rings, compressed
    entries, indexer keys), the first token and the seeded sampling parameters, so the
    tokens equal a colocated instance's. Transport: a reference in one process; the Ray
    object store or a pull from a Ray worker (cluster/backends/ray_handoff.py).
    """

    def __init__(
        self, prefill: list[Engine], decode: list[Engine], names: tuple[str, str] = ("prefill", "decode"),
        on_failure: str = "recompute",
    ) -> None:  # fmt: skip
        if not prefill or not decode:
            raise ValueError("disaggregated serving needs at least one prefill and one decode instance")
        if on_failure not in ("recompute", "fail"):
            raise ValueError(f"on_failure must be recompute or fail, got {on_failure!r}")
        super().__init__([*prefill, *decode], pool="+".join(names))
        self.names, self.on_failure = names, on_failure
        self.recomputed = 0
        self.prefill, self.decode = range(len(prefill)), range(len(prefill), len(prefill) + len(decode))
        self.handoffs = 0
        self.handoff_bytes = 0
        self.handoff_s = 0.0

    def _pick_in(self, candidates: range) -> int:
        return min(candidates, key=lambda i: (self.score(i), i))

    def _pick(self, exclude: int | None = None) -> int:
        """A retry goes to another prefill instance (it then runs there to the end), else anywhere."""
        others = [i for i in self.prefill if i != exclude] or [i for i in range(len(self.engines)) if i != exclude]
        return min(others, key=lambda i: (self.score(i), i))

    def submit(self, request: GenerateRequest, sink: Sink) -> None:
        if request.sampling.seed is None:  # fixed here, so that a recompute draws the same tokens
            request = replace(request, sampling=replace(request.sampling, seed=random.getrandbits(62)))
        faults.hit("router.place")
        placed = _Placed(self._pick_in(self.prefill), request, sink)
        with self._lock:
            self._placed[request.uid] = placed
        try:
            self._start(placed)
        except BaseException:
            with self._lock:
                self._placed.pop(request.uid, None)
            raise

    def _start(self, placed: _Placed) -> None:
        engine = self.engines[placed.instance]
        engine.submit(placed.request, lambda out: self._on_output(placed, out),
                      handoff=lambda prefilled: self._handoff(placed, prefilled))  # fmt: skip

    def _on_output(self, placed: _Placed, out: RequestOutput) -> None:
        """Forward to the client. A request whose state was lost (a prefill worker died
        before or during the handoff, a decode worker later) is recomputed once from its
        prompt with the same seed (`on_failure: recompute`; the tokens the client already
        has are swallowed) or ends UNAVAILABLE (`fail`)."""
        uid = placed.request.uid
        if out.unavailable and self.on_failure == "recompute" and not placed.retried:
            placed.retried, placed.skip = True, placed.emitted
            placed.instance = self._pick(exclude=placed.instance)
            try:
                self._start(placed)
                self.recomputed += 1
                log.warning("%s: state lost (%s); recomputing on instance %d", uid, out.error, placed.instance)
                return
            except Exception as e:  # nowhere to recompute: the client gets the failure
                log.error("%s: recompute failed: %s", uid, e)
        if placed.skip and out.token_ids:  # replayed by the recompute: the client has these
            placed.skip -= len(out.token_ids)
            if out.finish_reason is None:
                return
            out = replace(out, token_ids=(), text="", logprobs=())
        placed.emitted += len(out.token_ids)
        if out.finish_reason is not None:
            with self._lock:
                self._placed.pop(uid, None)
        placed.sink(out)

    def _handoff(self, placed: _Placed, prefilled: Prefilled) -> None:
        """In the prefill instance's loop thread: pass the request on to a decode instance."""
        t0 = time.perf_counter()
        target = self._pick_in(self.decode)
        with self._lock:
            placed.instance = target
        self.engines[target].submit_imported(prefilled, lambda out: self._on_output(placed, out))
        state = prefilled.ticket
        self.handoffs += 1
        self.handoff_bytes += state.nbytes()
        self.handoff_s += time.perf_counter() - t0
        log.debug("%s: %d tokens of state (%.1f KiB) handed to decode instance %d", placed.request.uid,
                  state.num_tokens, state.nbytes() / 1024, target - len(self.prefill))  # fmt: skip

    def load(self) -> dict[str, int]:
        total = super().load()
        total.update(handoffs=self.handoffs, handoff_bytes=self.handoff_bytes, handoff_recomputed=self.recomputed)
        return total

    def pools(self) -> list[tuple[str, str, list[Engine]]]:
        return [(self.names[0], "prefill", [self.engines[i] for i in self.prefill]),
                (self.names[1], "decode", [self.engines[i] for i in self.decode])]  # fmt: skip
