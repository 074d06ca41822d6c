"""`dsv4 status` and `dsv4 drain`: what a running server is doing, and stopping admission.

Both talk to the gateway (GetServerInfo, Drain); `status --ray-address` adds the Ray
cluster's nodes. Rates are the difference of two GetServerInfo calls `--interval` apart.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from cluster.cli.serve import DEFAULT_TARGET


class OpsError(ValueError):
    """An unreachable gateway or Ray cluster; printed without a traceback (exit 2)."""


USER_ERRORS: tuple[type[Exception], ...] = (OpsError,)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="pools, KV usage, load and request rates of a running server",
                       description="Ask a dsv4 gateway what it serves and how busy it is.")  # fmt: skip
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"gateway HOST:PORT (default {DEFAULT_TARGET})")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between the two samples of the rates")
    p.add_argument("--ray-address", help="also list the nodes of this Ray cluster (host:port or auto)")
    p.set_defaults(func=status_main)

    p = sub.add_parser(
        "drain",
        help="stop admitting requests; running ones finish",
        description="New Chat/Generate calls get UNAVAILABLE and health says NOT_SERVING; "
        "requests already running or waiting finish. With --wait, return once they have.",
    )
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"gateway HOST:PORT (default {DEFAULT_TARGET})")
    p.add_argument("--wait", type=float, metavar="SECONDS", help="wait up to SECONDS for the server to be idle")
    p.set_defaults(func=drain_main)


def _call(fn: Any, *args: Any) -> Any:
    from cluster.gateway.client import ChatClientError

    try:
        return fn(*args)
    except ChatClientError as e:
        raise OpsError(str(e)) from None


def format_load(load: Any) -> str:
    total = load.kv_pages_total or 1
    return (f"running {load.running}, waiting {load.waiting}; KV {load.kv_pages_used}/{load.kv_pages_total} pages "
            f"({100 * load.kv_pages_used / total:.1f}%, {load.page_size} tokens each; "
            f"{load.kv_pages_cached} pages of cached prefixes, "
            f"{load.prefix_hits}/{load.prefix_lookups} prefix hits)")  # fmt: skip


def format_status(first: Any, second: Any) -> list[str]:
    """Lines for `dsv4 status` from two ServerInfo samples (rates are their difference)."""
    dt = max(second.uptime_s - first.uptime_s, 1e-9)
    a, b = first.totals, second.totals
    lines = [
        f"backend {second.backend}, version {second.version}, up {second.uptime_s:.0f}s"
        + (", DRAINING" if second.draining else ""),
        f"load: {format_load(second.load)}",
        f"rates: {(b.requests_finished - a.requests_finished) / dt:.2f} requests/s, "
        f"{(b.prompt_tokens - a.prompt_tokens) / dt:.1f} prompt tokens/s, "
        f"{(b.completion_tokens - a.completion_tokens) / dt:.1f} completion tokens/s "
        f"(totals: {b.requests_finished} requests, {b.completion_tokens} completion tokens)",
    ]
    for pool in second.pools:
        lines.append(f"pool {pool.name} ({pool.role}): {pool.num_instances} instance(s); {format_load(pool.load)}")
        states = list(pool.instance_states)
        for i in sorted({w.instance for w in pool.workers} | {i for i, s in enumerate(states) if s != "serving"}):
            ranks = ", ".join(f"rank {w.rank} on {w.node}" for w in pool.workers if w.instance == i)
            state = states[i] if i < len(states) else "serving"
            note = "" if state == "serving" else f" ({state.upper()})"
            lines.append(f"  instance {i}{note}: {ranks or 'no workers'}")
    if second.expert_balance:
        worst = min(second.expert_balance, key=lambda b: b.balancedness)
        mean = sum(b.balancedness for b in second.expert_balance) / len(second.expert_balance)
        lines.append(f"expert balance (mean/max tokens per expert): {mean:.2f} over {len(second.expert_balance)} "
                     f"MoE layers, worst {worst.balancedness:.2f} (layer {worst.layer})")  # fmt: skip
    return lines


def ray_node_lines(address: str) -> list[str]:
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        return [f"ray: cannot reach {address} ({e})"]
    try:
        lines = []
        for node in ray.nodes():
            res = node.get("Resources", {})
            state = "alive" if node.get("Alive") else "dead"
            lines.append(f"node {node.get('NodeManagerAddress')} ({state}): {res.get('CPU', 0):g} CPU, "
                         f"{res.get('GPU', 0):g} GPU" + "".join(f", {k} {v:g}" for k, v in sorted(res.items())
                         if ":" not in k and k not in ("CPU", "GPU", "memory", "object_store_memory")))  # fmt: skip
        return lines
    finally:
        ray.shutdown()


def status_main(args: argparse.Namespace) -> None:
    from cluster.gateway.client import server_info

    first = _call(server_info, args.target)
    time.sleep(max(args.interval, 0.0))
    second = _call(server_info, args.target)
    print(f"gateway {args.target}")
    for line in format_status(first, second):
        print(line)
    if args.ray_address:
        for line in ray_node_lines(args.ray_address):
            print(line)


def drain_main(args: argparse.Namespace) -> None:
    from cluster.gateway.client import drain, server_info

    response = _call(drain, args.target)
    print(f"{args.target}: {'already ' if response.was_draining else ''}draining; {format_load(response.load)}")
    if args.wait is None:
        return
    deadline = time.monotonic() + args.wait
    load = response.load
    while load.running or load.waiting:
        if time.monotonic() > deadline:
            raise OpsError(f"still busy after {args.wait:g}s: {format_load(load)}")
        time.sleep(0.2)
        load = _call(server_info, args.target).load
    print(f"{args.target}: idle; safe to stop")
