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
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cluster.messages import RequestOutput

log = logging.getLogger("dsv4.metrics")

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_LOAD_GAUGES = {  # engine.load() key -> (metric name, help)
    "waiting": ("dsv4_queue_length", "requests waiting to be scheduled"),
    "running": ("dsv4_running_requests", "requests in the running batch"),
    "kv_pages_used": ("dsv4_kv_pages_used", "KV cache pages held by requests"),
    "kv_pages_free": ("dsv4_kv_pages_free", "KV cache pages free"),
    "kv_pages_total": ("dsv4_kv_pages_total", "KV cache pages in all"),
}


class _LoadCollector(Collector):
    def __init__(self, load: Callable[[], dict[str, int]]) -> None:
        self._load = load

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            load = self._load()
        except Exception:  # a scrape must not fail because the engine is going away
            log.exception("engine.load() failed during a scrape")
            return
        for key, (name, doc) in _LOAD_GAUGES.items():
            if key in load:
                yield GaugeMetricFamily(name, doc, value=load[key])


class GatewayMetrics:
    """Counters and histograms of one gateway, in a registry of its own."""

    def __init__(self, load: Callable[[], dict[str, int]] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("dsv4_time_to_first_token_seconds", "submit to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)  # fmt: skip
        self.itl = Histogram("dsv4_inter_token_latency_seconds", "time between tokens of a request",
                             buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tokens_in = Counter("dsv4_prompt_tokens", "prompt tokens submitted", registry=r)
        self.tokens_out = Counter("dsv4_generation_tokens", "completion tokens generated", registry=r)
        self.requests = Counter("dsv4_requests", "finished requests", ["finish_reason"], registry=r)
        if load is not None:
            r.register(_LoadCollector(load))
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
