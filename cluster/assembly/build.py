"""The assembly: a manifest -> started engines, one per instance of each pool, behind the
pool router when there are several (prefill + decode pools, or several instances).

Each component gets its part of the manifest: the backend builds an instance's workers
from the manifest and the pool (`cluster.backends.build_group`), the engine gets its
`EngineConfig`, the router its pools. `check_topology` refuses, before anything loads,
a topology the model cannot be split into.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.assembly.manifest import Manifest, ManifestError, PoolSpec

if TYPE_CHECKING:  # torch and the engine load when a model does, so `dsv4 chat` to a server starts fast
    import torch

    from cluster.engine.engine import Engine
    from cluster.engine.pool_router import InstanceRouter
    from cluster.gateway.core import ServingInfo

log = logging.getLogger("dsv4.assembly")


def compute_dtype(name: str | None, device: str = "auto") -> torch.dtype:
    """The manifest's `model.dtype` as a torch dtype; `auto`: bfloat16 where the workers run
    on a GPU, else bfloat16 where the CPU has it natively, else float32."""
    import torch

    from workers.layers import default_cpu_dtype

    if name not in (None, "auto"):
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
    return torch.bfloat16 if torch.cuda.is_available() and device != "cpu" else default_cpu_dtype()


def checkpoint_of(manifest: Manifest) -> Path:
    """The manifest's checkpoint directory; a preset's random model is written to the cache once."""
    from cluster.assembly.model_cache import ensure_preset_checkpoint

    spec = manifest.model
    if spec.checkpoint:
        return Path(spec.checkpoint)
    return ensure_preset_checkpoint(spec.preset or "tiny", spec.seed or 0)


def check_topology(manifest: Manifest, checkpoint: Path) -> None:
    """Refuse, before anything starts, a topology the model cannot be split into or this
    build cannot serve; the message names the manifest key."""
    from workers.config import ModelConfig

    cfg = ModelConfig.from_json(Path(checkpoint) / "config.json")
    for pool in manifest.pools:
        path = manifest.pool_path(pool)
        if cfg.n_routed_experts % pool.workers:
            raise ManifestError(
                f"{path}.workers",
                f"{cfg.n_routed_experts} routed experts cannot be split evenly over {pool.workers} workers",
            )
        if manifest.communicator_of(pool) == "nccl":
            import torch

            if torch.cuda.device_count() < 1:
                raise ManifestError(f"{path}.communicator", "nccl needs GPUs; this machine has none")
    ratios = sorted({r for r in (cfg.compress_ratio(i) for i in range(cfg.num_hidden_layers)) if r})
    page = manifest.scheduler.page_size
    if any(page % r for r in ratios):
        raise ManifestError(
            "scheduler.page_size", f"must be a multiple of {max(ratios)} (the model's compress ratios), got {page}"
        )


def serving_threads(requested: int | None = None) -> int:
    """torch's intra-op threads for a process that serves: `requested` when given (> 0), else
    every core this process may run on but one, which the gRPC / HTTP threads and the engine
    loop keep (measured on 2 cores: 2 OpenMP threads made the served engine 2.4x slower than
    1, the math and the serving threads fighting for the cores)."""
    if requested:
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # (not Linux)
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def build_instance(manifest: Manifest, pool: PoolSpec | None = None, checkpoint: Path | None = None, *,
                   progress: bool = False) -> Engine:  # fmt: skip
    """One started engine instance of `pool` (default: the manifest's first pool): its
    workers on the manifest's backend (the backend gets its part of the manifest as a
    `GroupSpec`), its tokenizer, its KV cache of `scheduler.kv_cache_*` per worker."""
    import torch

    from cluster.backends import build_group
    from cluster.backends.group import GroupSpec
    from cluster.engine.engine import Engine, EngineConfig
    from encoding.tokenizer import load_tokenizer
    from workers.kv_cache import KVCacheManager, KVLayout

    pool = pool or manifest.pools[0]
    checkpoint = checkpoint or checkpoint_of(manifest)
    sched = manifest.scheduler
    dtype = compute_dtype(manifest.model.dtype, manifest.model.device)
    t0 = time.perf_counter()
    group = build_group(manifest.backend, GroupSpec(
        checkpoint, pool.workers, dtype, manifest.model.simulate_quant, manifest.model.device, sched.page_size,
        progress, manifest.communicator_of(pool), pool.num_cpus, pool.num_gpus, pool.resources, pool.placement,
        manifest.ray.address, manifest.handoff_transport,
    ))  # fmt: skip
    cfg = group.model_config
    tokenizer = load_tokenizer(str(checkpoint))
    layout = KVLayout.for_model(cfg, elem_bytes=torch.empty(0, dtype=dtype).element_size())
    kv = KVCacheManager.from_bytes(layout, sched.kv_bytes * pool.workers, sched.page_size)  # kv_bytes is per worker
    config = EngineConfig(
        max_batch_tokens=sched.max_batch_tokens, max_running=sched.max_running, max_waiting=sched.max_waiting,
        max_model_len=min(sched.max_model_len, cfg.max_position_embeddings),
        prefix_cache=sched.prefix_cache and pool.role != "decode", handoff_timeout_s=sched.handoff_timeout_s,
        context_parallel_min_tokens=pool.context_parallel_min_tokens, health_check_s=sched.health_check_s,
    )  # fmt: skip
    log.info(
        "model loaded (%s) in %.1fs: %d layers, %d experts, KV %.0f B/token + %.1f MiB/request, %d pages of %d tokens",
        str(dtype).removeprefix("torch."), time.perf_counter() - t0, cfg.num_hidden_layers,
        cfg.n_routed_experts, layout.bytes_per_token, layout.bytes_per_seq / 2**20, kv.num_pages, sched.page_size,
    )  # fmt: skip
    return Engine(group, tokenizer, kv, config, eos_id=cfg.eos_token_id).start()


def boot(manifest: Manifest) -> tuple[Engine | InstanceRouter, ServingInfo]:
    """Load the manifest's model into started engines: one per instance of each pool, behind
    the pool router when there are several."""
    from cluster.engine.pool_router import DisaggRouter, InstanceRouter
    from cluster.gateway.core import ServingInfo

    checkpoint = checkpoint_of(manifest)
    check_topology(manifest, checkpoint)
    if manifest.backend == "inprocess":  # the math runs in this process, beside the serving threads
        import torch

        torch.set_num_threads(serving_threads())
        log.info("torch threads: %d (of %d cores; the rest serve)", torch.get_num_threads(), os.cpu_count() or 1)
    t0 = time.perf_counter()
    by_role: dict[str, list[Engine]] = {}
    for pool in manifest.pools:
        log.info("loading %s for pool %s (%s, backend %s, %d instance(s) of %d worker(s), %s communicator) ...",
                 checkpoint, pool.name, manifest.model.dtype, manifest.backend, pool.instances, pool.workers,
                 manifest.communicator_of(pool))  # fmt: skip
        by_role[pool.role] = [build_instance(manifest, pool, checkpoint, progress=sys.stderr.isatty())
                              for _ in range(pool.instances)]  # fmt: skip
    names = {p.role: p.name for p in manifest.pools}
    if "prefill" in by_role:
        engine = DisaggRouter(by_role["prefill"], by_role["decode"], (names["prefill"], names["decode"]),
                              on_failure=manifest.scheduler.handoff_failure)  # fmt: skip
    elif len(by_role["colocated"]) > 1:
        engine = InstanceRouter(by_role["colocated"], names["colocated"])
    else:
        engine = by_role["colocated"][0]
    log.info("engine up in %.1fs (max context %d tokens)", time.perf_counter() - t0, engine.config.max_model_len)
    dtype = str(compute_dtype(manifest.model.dtype, manifest.model.device)).removeprefix("torch.")  # what runs
    name = manifest.gateway.served_model_name or (Path(manifest.model.checkpoint).name if manifest.model.checkpoint
                                                   else f"dsv4-{manifest.model.source}")  # fmt: skip
    info = ServingInfo(engine.model_config, str(checkpoint), dtype, manifest.backend, engine.page_size, name=name)
    return engine, info
