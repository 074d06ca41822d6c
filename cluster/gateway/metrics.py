"""Prometheus metrics of one gateway: engine load, latency histograms, token and request counts.

Each `GatewayMetrics` owns its own `CollectorRegistry` (several servers may share a
process, in tests). Load gauges are read from `engine.load()` when scraped; the rest is
recorded from request outputs as they stream (the engine thread calls `observe`;
prometheus_client metrics are thread-safe).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cluster.engine.requests import RequestOutput
from router.stats import LayerStats

log = logging.getLogger("dsv4.metrics")

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_LOAD_GAUGES = {  # engine.load() key -> (metric name, help)
    "waiting": ("dsv4_queue_length", "requests waiting to be scheduled"),
    "running": ("dsv4_running_requests", "requests in the running batch"),
    "kv_pages_used": ("dsv4_kv_pages_used", "KV cache pages held by requests"),
    "kv_pages_free": ("dsv4_kv_pages_free", "KV cache pages free"),
    "kv_pages_total": ("dsv4_kv_pages_total", "KV cache pages in all"),
    "kv_pages_cached": ("dsv4_kv_pages_cached", "KV cache pages held by cached prompt prefixes"),
    "prefix_hits": ("dsv4_prefix_cache_hits", "admissions that reused a cached prefix"),
    "prefix_lookups": ("dsv4_prefix_cache_lookups", "admissions that looked for a cached prefix"),
}


_LOAD_COUNTERS = {  # engine.load() key -> (counter name, help)
    "steps": ("dsv4_engine_steps", "engine steps run (all instances)"),
    "handoffs": ("dsv4_kv_handoffs", "KV states handed from a prefill to a decode instance"),
    "handoff_bytes": ("dsv4_kv_handoff_bytes", "bytes of the KV states handed off"),
    "handoff_recomputed": ("dsv4_kv_handoff_recomputed", "requests recomputed after their state was lost"),
}


class _LoadCollector(Collector):
    def __init__(self, load: Callable[[], dict[str, int]]) -> None:
        self._load = load

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        try:
            load = self._load()
        except Exception:  # a scrape must not fail because the engine is going away
            log.exception("engine.load() failed during a scrape")
            return
        for key, (name, doc) in _LOAD_GAUGES.items():
            if key in load:
                yield GaugeMetricFamily(name, doc, value=load[key])
        for key, (name, doc) in _LOAD_COUNTERS.items():
            if key in load:
                yield CounterMetricFamily(name, doc, value=load[key])


class _RoutingCollector(Collector):
    """Per-layer expert load and all-to-all traffic: the engine's running totals, read at
    each scrape."""

    def __init__(self, totals: Callable[[], dict[int, LayerStats]]) -> None:
        self._totals_of = totals

    def collect(self) -> Iterator[Any]:
        try:
            totals = self._totals_of()
        except Exception:
            log.exception("reading the workers' routing stats failed during a scrape")
            totals = {}
        t: dict[tuple, float] = {}
        balance: dict[str, float] = {}
        for layer, st in totals.items():
            lay = str(layer)
            for e, n in enumerate(st.tokens_per_expert.tolist()):
                t[("tokens", lay, str(e))] = n
            t[("bytes", lay, "sent")], t[("bytes", lay, "recv")] = st.bytes_sent, st.bytes_recv
            t[("seconds", lay, "dispatch")], t[("seconds", lay, "combine")] = st.dispatch_s, st.combine_s
            if st.num_tokens:
                balance[lay] = st.balancedness
        tokens = CounterMetricFamily("dsv4_expert_tokens", "(token, expert) pairs routed to each expert",
                                     labels=["layer", "expert"])  # fmt: skip
        traffic = CounterMetricFamily("dsv4_alltoall_bytes", "all-to-all bytes of the MoE layers, all workers",
                                      labels=["layer", "direction"])  # fmt: skip
        seconds = CounterMetricFamily("dsv4_alltoall_seconds", "worker-seconds in dispatch and combine",
                                      labels=["layer", "phase"])  # fmt: skip
        families = {"tokens": tokens, "bytes": traffic, "seconds": seconds}
        for (metric, *labels), value in sorted(t.items()):
            families[metric].add_metric(labels, value)
        gauge = GaugeMetricFamily("dsv4_expert_balancedness", "mean / max tokens per expert since the start",
                                  labels=["layer"])  # fmt: skip
        for lay, value in sorted(balance.items()):
            gauge.add_metric([lay], value)
        yield from (tokens, traffic, seconds, gauge)


class GatewayMetrics:
    """Counters and histograms of one gateway, in a registry of its own. `routing` returns
    the workers' routing stats since the start (`Engine.routing_totals`)."""

    def __init__(
        self, load: Callable[[], dict[str, int]] | None = None,
        routing: Callable[[], dict[int, LayerStats]] | None = None,
    ) -> None:  # fmt: skip
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("dsv4_time_to_first_token_seconds", "submit to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)  # fmt: skip
        self.itl = Histogram("dsv4_inter_token_latency_seconds", "time between tokens of a request",
                             buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tokens_in = Counter("dsv4_prompt_tokens", "prompt tokens submitted", registry=r)
        self.tokens_out = Counter("dsv4_generation_tokens", "completion tokens generated", registry=r)
        self.requests = Counter("dsv4_requests", "finished requests", ["finish_reason"], registry=r)
        self.format_errors = Counter("dsv4_output_format_errors", "answers whose text broke the chat format "
                                     "(sent on as content unless the gateway is strict)", registry=r)  # fmt: skip
        if load is not None:
            r.register(_LoadCollector(load))
        if routing is not None:
            r.register(_RoutingCollector(routing))
        self._http: Any = None

    def on_submit(self, num_prompt_tokens: int) -> None:
        self.tokens_in.inc(num_prompt_tokens)

    def observe(self, out: RequestOutput, is_first: bool, since_last_s: float | None) -> None:
        """Record one engine output; `since_last_s` is the gap since the request's previous tokens."""
        if out.token_ids:
            self.tokens_out.inc(len(out.token_ids))
            if is_first:
                self.ttft.observe(out.time_to_first_token_ms / 1000)
            elif since_last_s is not None:
                per_token = since_last_s / len(out.token_ids)
                for _ in out.token_ids:
                    self.itl.observe(per_token)
        if out.finish_reason is not None:
            self.requests.labels(out.finish_reason).inc()

    def serve(self, port: int | None, host: str = "127.0.0.1") -> int | None:
        """Expose /metrics over HTTP; `port` 0 or None = off. Returns the bound port."""
        if not port:
            return None
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
