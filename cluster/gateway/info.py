"""The unary RPCs: Abort, GetModelInfo, GetServerInfo (load, pools, where the workers run,
expert balance, totals) and Drain. An info call never fails because a worker is being
rebuilt: what cannot be read is left out and logged."""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc

from cluster.gateway.core import Gateway, GatewayError
from cluster.gateway.guard import quote
from cluster.gateway.metrics import GatewayMetrics
from encoding import VOCAB_SIZE
from protos import load as load_protos

pb, _ = load_protos()
log = logging.getLogger("dsv4.gateway")


def abort(gateway: Gateway, request_id: str) -> None:
    if not request_id or not gateway.engine.abort(request_id):
        raise GatewayError(
            grpc.StatusCode.INVALID_ARGUMENT, f"request_id: no running or waiting request {quote(request_id)}"
        )


def model_info(gateway: Gateway) -> Any:
    cfg = gateway.info.model
    return pb.ModelInfo(
        architecture=(cfg.extra.get("architectures") or ["DeepseekV4ForCausalLM"])[0],
        checkpoint=gateway.info.checkpoint,
        dtype=gateway.info.dtype,
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        head_dim=cfg.head_dim,
        num_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        num_shared_experts=cfg.n_shared_experts,
        vocab_size=cfg.vocab_size,
        max_context=gateway.max_len(),
        tokenizer_path=str(getattr(gateway.engine.tokenizer, "path", "")),
        tokenizer_vocab_size=VOCAB_SIZE,
    )


def load(gateway: Gateway, raw: dict[str, int] | None = None) -> Any:
    """The engine's load (or `raw`, a load dict) as a Load message."""
    raw = gateway.engine.load() if raw is None else raw
    return pb.Load(
        running=raw.get("running", 0),
        waiting=raw.get("waiting", 0),
        kv_pages_used=raw.get("kv_pages_used", 0),
        kv_pages_free=raw.get("kv_pages_free", 0),
        kv_pages_total=raw.get("kv_pages_total", 0),
        page_size=gateway.info.page_size,
        kv_pages_cached=raw.get("kv_pages_cached", 0),
        prefix_hits=raw.get("prefix_hits", 0),
        prefix_lookups=raw.get("prefix_lookups", 0),
    )


def server_info(gateway: Gateway) -> Any:
    current = load(gateway)
    return pb.ServerInfo(
        expert_balance=_expert_balance(gateway),
        backend=gateway.info.backend,
        version=gateway.info.version,
        draining=gateway.draining,
        uptime_s=time.monotonic() - gateway.started,
        load=current,
        pools=_pools(gateway),
        totals=_totals(gateway.metrics),
    )


def _pools(gateway: Gateway) -> list[Any]:
    """One PoolInfo per pool: its instances' summed load and where their workers run."""
    pools = getattr(gateway.engine, "pools", None)
    groups = pools() if pools is not None else [("colocated", "colocated", [gateway.engine])]
    out = []
    for name, role, engines in groups:
        loads = [e.load() for e in engines]
        summed = {k: sum(d.get(k, 0) for d in loads) for k in loads[0]} if loads else {}
        states = [getattr(e, "health", "serving") for e in engines]
        out.append(pb.PoolInfo(name=name, role=role, num_instances=len(engines), load=load(gateway, summed),
                               workers=_workers(engines), instance_states=states))  # fmt: skip
    return out


def _workers(engines: list[Any]) -> list[Any]:
    out = []
    for i, engine in enumerate(engines):
        nodes = getattr(engine, "worker_nodes", None)
        try:
            ranks = nodes() if nodes is not None else []
        except Exception as e:  # an info call must not fail because a worker is being rebuilt
            log.warning("reading the workers' nodes failed: %s", e)
            ranks = []
        out += [pb.WorkerInfo(instance=i, rank=r, node=node) for r, node in enumerate(ranks)]
    return out


def _expert_balance(gateway: Gateway) -> list[Any]:
    totals = getattr(gateway.engine, "routing_totals", None)
    if totals is None:
        return []
    try:
        stats = totals()
    except Exception as e:  # an info call must not fail because a worker is being rebuilt
        log.warning("reading the routing stats failed: %s", e)
        return []
    return [pb.LayerBalance(layer=layer, balancedness=st.balancedness, tokens=int(st.tokens_per_expert.sum()))
            for layer, st in stats.items() if st.num_tokens]  # fmt: skip


def drain(gateway: Gateway) -> Any:
    """Stop admitting new requests; the running and waiting ones finish."""
    was_draining, gateway.draining = gateway.draining, True
    if not was_draining:
        log.info("draining: new requests get UNAVAILABLE; running requests finish")
    return pb.DrainResponse(was_draining=was_draining, load=load(gateway))


def _totals(metrics: GatewayMetrics) -> Any:
    """The gateway's Prometheus counters as a Totals message."""
    reg = metrics.registry
    finished = sum(s.value for m in metrics.requests.collect() for s in m.samples if s.name.endswith("_total"))
    return pb.Totals(
        requests_finished=int(finished),
        prompt_tokens=int(reg.get_sample_value("dsv4_prompt_tokens_total") or 0),
        completion_tokens=int(reg.get_sample_value("dsv4_generation_tokens_total") or 0),
    )
