"""The serving engine: a loop thread that schedules steps on a model worker and streams
`RequestOutput`s to each request's sink.

Thread model: `submit`/`abort` may be called from any thread (the gRPC server's); the
loop thread owns the scheduler, the worker and every request's text stream. A failing
step fails the requests in it, frees their state and pages, and the loop goes on.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from cluster.engine.requests import (
    EngineUnavailableError,
    GenerateRequest,
    QueueFullError,
    RequestError,
    RequestOutput,
    validate_sampling,
)
from cluster.engine.scheduler import SchedRequest, Scheduler
from cluster.engine.textstream import TextStream
from encoding.tokenizer import DeepSeekV4Tokenizer
from router.stats import merge
from workers.handoff import discard
from workers.kv_cache import KVCacheManager
from workers.step import Prefilled, SamplingParams, StepPlan, StepResult

if TYPE_CHECKING:
    from cluster.backends.group import WorkerGroup

log = logging.getLogger("dsv4.engine")

Sink = Callable[[RequestOutput], None]


@dataclass(frozen=True)
class EngineConfig:
    max_batch_tokens: int = 512  # tokens per step (prefill chunks + decodes)
    max_running: int = 64  # requests in the running batch
    max_waiting: int = 1024  # queued requests before RESOURCE_EXHAUSTED
    max_model_len: int = 1048576  # prompt + completion tokens per request
    prefix_cache: bool = False  # keep states at page boundaries and reuse them for prompts that share them
    handoff_timeout_s: float = 30.0  # a KV handoff's export from a remote (Ray) worker; past it the state is lost
    context_parallel_min_tokens: int = 0  # new prompts this long prefill split over the workers (0 = off)
    health_check_s: float = 5.0  # while idle, ask the workers this often whether they live (a lost one is rebuilt)


@dataclass
class _Live:
    """Engine-side state of one request."""

    req: SchedRequest
    sink: Sink
    text: TextStream
    t_submit: float
    t_first: float | None = None
    pending_abort: bool = False
    handoff: Handoff | None = None  # prefill-only: called with the request, prefilled, after the first token


Handoff = Callable[[Prefilled], None]  # passes a prefilled request on to a decode instance


@dataclass
class EngineStats:
    steps: int = 0
    tokens_in: int = 0  # prompt tokens admitted
    tokens_out: int = 0  # completion tokens produced
    preemptions: int = 0
    step_listeners: list[Callable[[float, int], None]] = field(default_factory=list)  # (seconds, tokens)


class Engine:
    def __init__(
        self, worker: WorkerGroup, tokenizer: DeepSeekV4Tokenizer, kv: KVCacheManager, config: EngineConfig,
        eos_id: int = 1,
    ) -> None:  # fmt: skip
        self.worker, self.tokenizer, self.kv, self.config, self.eos_id = worker, tokenizer, kv, config, eos_id
        self.scheduler = Scheduler(kv, config.max_batch_tokens, config.max_running, config.prefix_cache,
                                   cp_ranks=worker.world_size,
                                   cp_min_tokens=config.context_parallel_min_tokens)  # fmt: skip
        self.stats = EngineStats()
        self._live: dict[str, _Live] = {}
        self._inbox: list[tuple[str, object]] = []  # ("submit", _Live) | ("abort", uid)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False
        self.vocab_size = worker.model_config.vocab_size
        self._routing: dict = {}  # layer -> LayerStats, running totals
        self._routing_lock = threading.Lock()
        # what info calls report without asking the workers (refreshed by the loop: they may be busy or lost)
        self._worker_states = 0
        self._nodes = list(worker.nodes())
        self._checked = time.monotonic()  # the last health check

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="dsv4-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop admitting; with `drain`, finish what runs first; then end the loop."""
        with self._cv:
            self._draining = True
            if not drain:
                for uid in list(self._live):
                    self._inbox.append(("abort", uid))
            self._cv.notify_all()
        deadline = time.monotonic() + timeout
        while self._live and time.monotonic() < deadline and drain:
            time.sleep(0.01)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- API (any thread) --------------------------------------------------------------------
    def submit(self, request: GenerateRequest, sink: Sink, handoff: Handoff | None = None) -> None:
        """Queue a request; raises RequestError / QueueFullError / EngineUnavailableError.
        With `handoff` the engine only prefills: after the first token it exports the
        request's state and calls `handoff(prefilled)` instead of decoding on."""
        self._validate(request)
        params = request.sampling
        if params.seed is None:  # fixed now, so a preempted request redraws the same numbers
            params = _with_seed(params, random.getrandbits(62))
        req = SchedRequest(request.uid, list(request.prompt_ids), params)
        live = _Live(req, sink, TextStream(self.tokenizer, params.stop), time.monotonic(), handoff=handoff)
        self._enqueue(live)

    def submit_imported(self, prefilled: Prefilled, sink: Sink) -> None:
        """Continue a request another instance prefilled (KV handoff in): its prompt, first
        token, seeded params and times, and the ticket of its exported KV state. Decoding
        resumes at the first token, with the same RNG stream. Raises ValueError, before
        anything is reserved, for a state this instance's KV pool cannot import (another
        model or dtype, a malformed or missing object)."""
        problem = self.worker.check_import(prefilled.ticket)
        if problem is not None:
            discard(prefilled.ticket)
            raise ValueError(f"{prefilled.uid}: the handed-off state cannot be imported: {problem}")
        req = SchedRequest(prefilled.uid, list(prefilled.prompt_ids), prefilled.sampling,
                           output=list(prefilled.output_ids), imported=prefilled.ticket,
                           cached=prefilled.cached_tokens)  # fmt: skip
        text = TextStream(self.tokenizer, prefilled.sampling.stop)
        for token in prefilled.output_ids:  # already streamed by the prefill instance
            text.push(token)
        self._enqueue(_Live(req, sink, text, prefilled.t_submit, prefilled.t_first))

    def _enqueue(self, live: _Live) -> None:
        request = live.req
        with self._cv:
            if self._draining or self._stopping:
                raise EngineUnavailableError("the engine is draining and admits no new requests")
            if request.uid in self._live or any(k == "submit" and v.req.uid == request.uid for k, v in self._inbox):
                raise RequestError("request_id", f"{request.uid!r} is already running")
            if len(self.scheduler.waiting) + len(self._inbox) >= self.config.max_waiting:
                raise QueueFullError(f"{self.config.max_waiting} requests are already waiting")
            self._inbox.append(("submit", live))
            self._cv.notify_all()

    def abort(self, uid: str) -> bool:
        """Cancel a request; False if no such request is running or waiting."""
        with self._cv:
            known = uid in self._live or any(k == "submit" and v.req.uid == uid for k, v in self._inbox)
            if known:
                self._inbox.append(("abort", uid))
                self._cv.notify_all()
            return known

    @property
    def model_config(self):
        """The served model's ModelConfig."""
        return self.worker.model_config

    @property
    def page_size(self) -> int:
        """Raw tokens per KV page."""
        return self.kv.page_size

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until no request is live and the worker holds no state (tests, drain)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cv:
                idle = not self._live and not self._inbox and not self.scheduler.has_work()
            if idle and self._held_states() == 0:
                self._worker_states = 0
                return True
            time.sleep(0.005)
        return False

    def _held_states(self) -> int | None:
        """States the workers hold now; None while they cannot say (lost, rebuilding)."""
        try:
            return self.worker.num_states()
        except EngineUnavailableError:
            return None

    @property
    def health(self) -> str:
        """serving | rebuilding (its workers were lost and are starting again) | down."""
        return self.worker.state

    def worker_nodes(self) -> list[str]:
        """Where each rank of this instance runs: Ray node addresses, or "local" (as last
        seen: never waits on the workers)."""
        return list(self._nodes)

    def routing_totals(self) -> dict:
        """The workers' per-layer routing and all-to-all stats since the engine started
        (layer -> router.stats.LayerStats; tokens per expert are the EPLB input). Workers
        that cannot answer now (lost, rebuilding, busy past a short timeout) add nothing."""
        with self._routing_lock:
            try:
                self._routing = merge([self._routing, self.worker.routing_window()])
            except EngineUnavailableError as e:
                log.debug("routing stats left out: %s", e)
            return dict(self._routing)

    def load(self) -> dict[str, int]:
        """Pages held by requests (`kv_pages_used`) and by cached prefixes (`kv_pages_cached`,
        given back on demand) are counted apart; free = total - both."""
        prefix = self.scheduler.prefix
        cached = prefix.cached_pages if prefix is not None else 0
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting) + len(self._inbox),
            "kv_pages_used": self.kv.used_pages - cached,
            "kv_pages_cached": cached,
            "kv_pages_free": self.kv.free_pages,
            "kv_pages_total": self.kv.num_pages,
            "worker_states": self._worker_states,  # as last seen by the loop (never waits on the workers)
            "instances_unhealthy": int(self.worker.state != "serving"),
            "prefix_hits": prefix.hits if prefix is not None else 0,
            "prefix_lookups": prefix.lookups if prefix is not None else 0,
            "steps": self.stats.steps,
        }

    def _validate(self, request: GenerateRequest) -> None:
        validate_sampling(request.sampling)
        n = len(request.prompt_ids)
        if n == 0:
            raise RequestError("prompt", "is empty")
        bad = next((t for t in request.prompt_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError("prompt_ids", f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        total = n + request.sampling.max_tokens
        if total > self.config.max_model_len:
            raise RequestError(
                "sampling.max_tokens",
                f"prompt ({n} tokens) + max_tokens ({request.sampling.max_tokens}) = {total} exceeds the "
                f"maximum context of {self.config.max_model_len} tokens",
            )
        if not self.kv.fits_ever(total):
            raise RequestError(
                "sampling.max_tokens",
                f"prompt + max_tokens = {total} tokens needs {self.kv.pages_for(total)} KV pages; "
                f"the cache has {self.kv.num_pages}",
            )

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and not self.scheduler.has_work() and not self._stopping:
                    if not self._cv.wait(timeout=self.config.health_check_s):
                        break  # idle for a while: see that the workers live
                if self._stopping:
                    break
                inbox, self._inbox = self._inbox, []
            for kind, item in inbox:
                self._ingest(kind, item)
            if self.scheduler.has_work():
                self._step()
            else:
                self._idle()
        for uid in list(self._live):
            self._finish(uid, "abort")

    def _idle(self) -> None:
        """Between bursts of work: refresh what info calls report, and every
        `health_check_s` ask the workers whether they live (a lost one is rebuilt now,
        not when a request next lands on it)."""
        due = time.monotonic() - self._checked >= self.config.health_check_s or self.worker.state != "serving"
        if due:
            self._checked = time.monotonic()
            try:
                self.worker.check()
            except EngineUnavailableError as e:
                log.error("workers lost while idle: %s", e)
                self._lost_states(f"unavailable: {e}")
            except Exception:  # a health check must never end the loop
                log.exception("the workers' health check failed")
        try:
            self._worker_states = self.worker.num_states()
            if due:  # (ranks move only when rebuilt: no need to ask after every burst)
                self._nodes = list(self.worker.nodes())
        except EngineUnavailableError:  # lost since: the next check rebuilds it
            pass

    def _lost_states(self, error: str) -> None:
        """The workers lost every state: cached prefixes go, running requests fail (retryable)."""
        if self.scheduler.prefix is not None:
            self.scheduler.prefix.reset()
        for req in [*self.scheduler.running]:
            self._finish(req.uid, "error", error=error, unavailable=True)
        self._checked = time.monotonic()  # (rebuilt just now)

    def _ingest(self, kind: str, item) -> None:
        if kind == "submit":
            self._live[item.req.uid] = item
            self.scheduler.add(item.req)
            self.stats.tokens_in += len(item.req.prompt)
        elif item in self._live:
            self._finish(item, "abort")

    def _step(self) -> None:
        plan = self.scheduler.schedule()
        if not plan.work and not plan.finished:
            time.sleep(0.001)  # nothing fits right now (pages); wait for frees
            return
        exports = frozenset(w.uid for w in plan.work if w.sample and self._hands_off(w.uid))
        if exports:  # their last prompt chunk: the worker ships their state layer by layer as it computes
            plan = replace(plan, exports=exports)
        t0 = time.perf_counter()
        try:
            result = self.worker.execute(plan)
        except EngineUnavailableError as e:  # the workers lost every request's state
            log.error("workers lost: %s", e)
            self._lost_states(f"unavailable: {e}")
            return
        except Exception as e:  # a bad step fails its requests, never the engine
            log.exception("step failed")
            for w in plan.work:  # a state handed over in this step is lost: the handoff failure policy applies
                self._finish(w.uid, "error", error=f"engine step failed: {type(e).__name__}: {e}",
                             unavailable=w.uid in plan.imports)  # fmt: skip
            return
        self.stats.steps += 1
        n_tokens = sum(len(w.token_ids) for w in plan.work)
        for listener in self.stats.step_listeners:
            listener(time.perf_counter() - t0, n_tokens)
        self._postprocess(plan, result)

    def _hands_off(self, uid: str) -> bool:
        live = self._live.get(uid)
        return live is not None and live.handoff is not None and not live.req.output

    def _postprocess(self, plan: StepPlan, result: StepResult) -> None:
        for uid, why in result.failed.items():  # its handed-off state did not arrive: the failure policy applies
            log.error("%s: %s", uid, why)
            if uid in plan.snapshots and self.scheduler.prefix is not None:  # the worker kept nothing for it
                self.scheduler.prefix.remove(plan.snapshots[uid])
            self._finish(uid, "error", error=f"KV handoff failed: {why}", unavailable=True)
        for uid, token in result.tokens.items():
            live = self._live.get(uid)
            if live is None:
                continue
            live.req.output.append(token)
            self.stats.tokens_out += 1
            now = time.monotonic()
            if live.t_first is None:
                live.t_first = now
            reason = self._stop_reason(live, token)
            emit_text = token != self.eos_id and token not in live.req.sampling.stop_token_ids
            text = live.text.push(token) if emit_text else ""
            if live.text.stopped:
                reason = "stop"
            lp = (result.logprobs[uid],) if uid in result.logprobs else ()
            if reason is not None and not live.text.stopped:
                text += live.text.finish()
            self._emit(live, RequestOutput(uid, (token,), text, lp, **self._usage(live)))
            if reason is not None:
                self._finish(uid, reason)
            elif live.handoff is not None:
                self._hand_off(live)

    def _hand_off(self, live: _Live) -> None:
        """Prefill done: export the state, let go of the request here, pass it on. A failed
        or timed-out export ends the request here UNAVAILABLE (the handoff failure policy
        applies); its pages are freed and the worker's copy is released by the next plan."""
        uid = live.req.uid
        try:
            state = self.worker.export(uid, timeout=self.config.handoff_timeout_s)
        except Exception as e:  # the state is gone with its worker (or too slow to come): the request fails here
            log.error("%s: exporting its state failed: %s", uid, e, exc_info=not isinstance(e, EngineUnavailableError))
            self._finish(uid, "error", error=f"KV handoff failed: {type(e).__name__}: {e}", unavailable=True)
            return
        self._live.pop(uid, None)
        self.scheduler.remove(uid)
        prefilled = Prefilled(uid, tuple(live.req.prompt), tuple(live.req.output), live.req.sampling,
                              live.req.cached, state, live.t_submit, live.t_first)  # fmt: skip
        try:
            live.handoff(prefilled)
        except Exception as e:  # no decode instance took it: the client still gets a final message
            log.exception("%s: handoff failed", uid)
            discard(state)  # (its holder frees it now)
            self._emit(live, RequestOutput(uid, finish_reason="error", error=f"KV handoff failed: {e}",
                                           unavailable=True, **self._usage(live)))  # fmt: skip

    def _stop_reason(self, live: _Live, token: int) -> str | None:
        p = live.req.sampling
        if (token == self.eos_id and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if len(live.req.output) >= p.max_tokens:
            return "length"
        return None

    def _usage(self, live: _Live) -> dict:
        ttft = 0.0 if live.t_first is None else (live.t_first - live.t_submit) * 1000
        return {
            "prompt_tokens": len(live.req.prompt),
            "completion_tokens": len(live.req.output),
            "cached_tokens": live.req.cached,
            "time_to_first_token_ms": ttft,
        }

    def _finish(self, uid: str, reason: str, error: str | None = None, unavailable: bool = False) -> None:
        live = self._live.pop(uid, None)
        if live is None:
            return
        self.scheduler.remove(uid)
        self.stats.preemptions += live.req.num_preemptions
        out = RequestOutput(uid, finish_reason=reason, error=error, unavailable=unavailable, **self._usage(live))
        self._emit(live, out)

    @staticmethod
    def _emit(live: _Live, out: RequestOutput) -> None:
        try:
            live.sink(out)
        except Exception:  # a broken sink (client gone) must not stop the engine
            log.exception("sink of %s failed", out.uid)


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return replace(params, seed=seed)
