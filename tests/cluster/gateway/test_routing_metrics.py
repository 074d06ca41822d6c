"""Per-expert token counts and all-to-all traffic reach Prometheus through the engine.

Oracle: every token the model runs is routed to top-k experts in every MoE layer, so a
layer's counts sum to (prompt + fed-back tokens) x k; the exposition text is parsed back.
"""

from __future__ import annotations

import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cluster.backends.local import LocalWorkerGroup
from cluster.engine.engine import Engine, EngineConfig
from cluster.engine.requests import GenerateRequest
from cluster.gateway.metrics import GatewayMetrics
from encoding.tokenizer import load_tokenizer
from tests.cluster.engine.test_engine import prompts, run
from workers.kv_cache import KVCacheManager, KVLayout
from workers.step import SamplingParams
from workers.weights import load_model
from workers.worker import ModelWorker


def _samples(metrics: GatewayMetrics, name: str) -> dict[tuple, float]:
    text = generate_latest(metrics.registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def _engine(worker, cfg) -> Engine:
    group = worker if isinstance(worker, LocalWorkerGroup) else LocalWorkerGroup([worker])
    return Engine(group, load_tokenizer(), KVCacheManager(KVLayout.for_model(cfg, 4), 4096), EngineConfig()).start()


def _serve(engine: Engine, n_tokens: int) -> int:
    """Run two requests; return the tokens the model ran (prompts + tokens fed back)."""
    ps = prompts(2, length=10, seed=13)
    params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
    run(engine, [GenerateRequest(f"m{i}", p, params) for i, p in enumerate(ps)])
    return sum(len(p) + n_tokens - 1 for p in ps)


def test_expert_counts_match_the_tokens_run(tiny_checkpoint):
    model = load_model(tiny_checkpoint, dtype=torch.float32, progress=False)
    cfg = model.cfg
    engine = _engine(ModelWorker(model), cfg)
    metrics = GatewayMetrics(engine.load, engine.routing_totals)
    ran = _serve(engine, 4)
    tokens = _samples(metrics, "dsv4_expert_tokens_total")
    for layer in range(cfg.num_hidden_layers):
        per_expert = [tokens.get((("expert", str(e)), ("layer", str(layer))), 0) for e in range(cfg.n_routed_experts)]
        assert sum(per_expert) == ran * cfg.num_experts_per_tok, layer
    balance = _samples(metrics, "dsv4_expert_balancedness")
    assert all(0 < v <= 1 for v in balance.values()) and len(balance) == cfg.num_hidden_layers
    ran += _serve(engine, 2)  # counters keep running totals across windows
    tokens = _samples(metrics, "dsv4_expert_tokens_total")
    assert sum(v for k, v in tokens.items() if ("layer", "0") in k) == ran * cfg.num_experts_per_tok
    engine.stop()


def test_expert_parallel_traffic_is_exported(tiny_checkpoint):
    group = LocalWorkerGroup.load(tiny_checkpoint, 2, dtype=torch.float32)
    engine = _engine(group, group.model_config)
    metrics = GatewayMetrics(engine.load, engine.routing_totals)
    ran = _serve(engine, 3)
    tokens = _samples(metrics, "dsv4_expert_tokens_total")
    k = group.model_config.num_experts_per_tok
    assert sum(v for key, v in tokens.items() if ("layer", "1") in key) == ran * k
    sent = _samples(metrics, "dsv4_alltoall_bytes_total")
    recv_total = sum(v for key, v in sent.items() if ("direction", "recv") in key)
    sent_total = sum(v for key, v in sent.items() if ("direction", "sent") in key)
    assert sent_total > 0 and sent_total == recv_total  # every byte sent by one rank is received by one
    seconds = _samples(metrics, "dsv4_alltoall_seconds_total")
    assert {dict(key)["phase"] for key in seconds} == {"dispatch", "combine"}
    engine.stop()
