"""`dsv4 deploy check`: can the nodes of a running Ray cluster host a topology?

Pure over a list of `NodeInfo` (what `ray.nodes()` reports, plus GPU memory from the
`accelerator_type:*` resource), so tests feed it made-up clusters. Each problem names the
manifest key that would have to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cluster.assembly.manifest import Manifest, PoolSpec
from cluster.deploy.memory import GIB, GPU_MEMORY, kv_bytes_for, manifest_memory
from workers.config import ModelConfig

_KIND_KEY = {"CPU": "num_cpus", "GPU": "num_gpus"}


@dataclass(frozen=True)
class NodeInfo:
    address: str
    resources: dict[str, float]  # Ray's total resources of the node
    gpu_memory: float | None = None  # bytes per GPU; None when unknown


@dataclass(frozen=True)
class Problem:
    path: str  # manifest key path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not checked, and why

    @property
    def ok(self) -> bool:
        return not self.problems


def nodes_from_ray(raw: list[dict[str, Any]], gpu_memory: float | None = None) -> list[NodeInfo]:
    """NodeInfo for the live nodes of `ray.nodes()`; `gpu_memory` overrides the table."""
    out = []
    for node in raw:
        if not node.get("Alive", True):
            continue
        res = {k: float(v) for k, v in node.get("Resources", {}).items()}
        accel = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), None)
        mem = gpu_memory or GPU_MEMORY.get(accel or "")
        out.append(NodeInfo(node.get("NodeManagerAddress", "?"), res, mem if res.get("GPU") else None))
    return out


def _bundle(pool: PoolSpec) -> dict[str, float]:
    bundle = {"CPU": pool.num_cpus, **dict(pool.resources)}
    if pool.num_gpus:
        bundle["GPU"] = pool.num_gpus
    return bundle


def _fits(bundle: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())


def _show(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


def _key(manifest: Manifest, pool: PoolSpec, kind: str) -> str:
    return f"{manifest.pool_path(pool)}.{_KIND_KEY.get(kind, 'resources.' + kind)}"


def check_resources(manifest: Manifest, nodes: list[NodeInfo]) -> list[Problem]:
    """Totals per resource, one worker per node, then all workers packed (first fit)."""
    problems: list[Problem] = []
    total: dict[str, float] = {}
    for node in nodes:
        for k, v in node.resources.items():
            total[k] = total.get(k, 0.0) + v
    demand: dict[str, float] = {}
    for pool in manifest.pools:
        for k, v in _bundle(pool).items():
            demand[k] = demand.get(k, 0.0) + v * pool.instances * pool.workers
    for pool in manifest.pools:
        n = pool.instances * pool.workers
        for k, v in _bundle(pool).items():
            if demand[k] > total.get(k, 0.0) + 1e-9:
                shared = " (all pools together)" if demand[k] != v * n else ""
                problems.append(Problem(_key(manifest, pool, k), f"{n} workers x {v:g} {k} = {demand[k]:g} {k} "
                                        f"needed{shared}; the cluster has {total.get(k, 0.0):g}"))  # fmt: skip
        if not any(_fits(_bundle(pool), node.resources) for node in nodes):
            problems.append(Problem(manifest.pool_path(pool), f"no node can hold one worker {_show(_bundle(pool))}; "
                                    f"nodes: {'; '.join(_show(nd.resources) for nd in nodes) or 'none'}"))  # fmt: skip
    if not problems:
        problems += _pack(manifest, nodes)
    return problems


def _pack(manifest: Manifest, nodes: list[NodeInfo]) -> list[Problem]:
    free = [dict(node.resources) for node in nodes]
    bundles = [(pool, _bundle(pool)) for pool in manifest.pools for _ in range(pool.instances * pool.workers)]
    bundles.sort(key=lambda pb: (-pb[1].get("GPU", 0.0), -pb[1]["CPU"]))
    for pool, bundle in bundles:
        node = next((f for f in free if _fits(bundle, f)), None)
        if node is None:
            return [Problem(manifest.pool_path(pool), f"the workers do not pack onto the nodes: one {_show(bundle)} "
                            "is left over once the others are placed")]  # fmt: skip
        for k, v in bundle.items():
            node[k] -= v
    return []


def check_memory(manifest: Manifest, cfg: ModelConfig, nodes: list[NodeInfo]) -> Report:
    """Weights + KV cache + activations of one worker against the GPU it lands on."""
    report = Report()
    sched = manifest.scheduler
    kv_key = "scheduler.kv_cache_bytes" if sched.kv_cache_bytes is not None else "scheduler.kv_cache_gib"
    longest = min(sched.max_model_len, cfg.max_position_embeddings)
    need = kv_bytes_for(cfg, longest)
    if need > sched.kv_bytes:
        report.problems.append(
            Problem(
                kv_key,
                f"one {longest}-token request (scheduler.max_model_len) needs "
                f"{need / GIB:.2f} GiB of KV; the cache has {sched.kv_bytes / GIB:.2f} GiB",
            )
        )
    for pool in manifest.pools:
        path = manifest.pool_path(pool)
        if cfg.n_routed_experts % pool.workers:
            report.problems.append(Problem(f"{path}.workers", f"{cfg.n_routed_experts} routed experts cannot be "
                                           f"split evenly over {pool.workers} workers"))  # fmt: skip
            continue
        if not pool.num_gpus:
            report.notes.append(f"{path}: CPU workers; memory per worker not checked")
            continue
        hosts = [n for n in nodes if _fits(_bundle(pool), n.resources)]
        known = [n.gpu_memory for n in hosts if n.gpu_memory]
        if not known:
            report.notes.append(f"{path}: GPU memory unknown (no accelerator_type); pass --gpu-memory-gib")
            continue
        have = min(known) * pool.num_gpus
        mem = manifest_memory(manifest, pool, cfg)
        if mem.total > have:
            key = f"{path}.workers" if mem.weights + mem.activations > have else kv_key
            report.problems.append(
                Problem(
                    key,
                    f"a worker needs {mem.weights / GIB:.1f} GiB of weights + "
                    f"{mem.kv / GIB:.1f} GiB KV + {mem.activations / GIB:.1f} GiB activations"
                    f" = {mem.total / GIB:.1f} GiB; its GPU has {have / GIB:.1f} GiB",
                )
            )
    return report


def check_cluster(manifest: Manifest, cfg: ModelConfig, nodes: list[NodeInfo]) -> Report:
    """Everything `dsv4 deploy check` says about `nodes` hosting `manifest`."""
    if manifest.backend != "ray":
        return Report([Problem("backend", f"{manifest.backend!r} runs without a Ray cluster; use backend: ray")])
    report = check_memory(manifest, cfg, nodes)
    report.problems[:0] = check_resources(manifest, nodes)
    return report
