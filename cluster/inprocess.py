"""The in-process backend: model, worker, tokenizer and engine in this process."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from cluster.engine import Engine, EngineConfig
from cluster.worker_group import LocalWorkerGroup
from encoding.tokenizer import load_tokenizer
from workers.kv_cache import KVCacheManager, KVLayout
from workers.layers import default_cpu_dtype
from workers.weights import load_model, serving_device
from workers.worker import ModelWorker

log = logging.getLogger("dsv4.inprocess")


def build_engine(
    checkpoint: str | Path,
    *,
    engine_config: EngineConfig | None = None,
    dtype: torch.dtype | None = None,
    kv_cache_bytes: int = 2 << 30,
    page_size: int = 128,
    simulate_quant: bool = True,
    progress: bool = True,
    workers: int = 1,
    backend: str = "inprocess",
    communicator: str = "local",
    ray_address: str | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    resources: dict[str, float] | None = None,
    placement: str = "spread",
    context_parallel_min_tokens: int = 0,
    device: str = "auto",
    handoff_transport: str = "object_store",
) -> Engine:
    """Load a checkpoint and return a started engine serving it. `workers` > 1 splits the
    experts over that many expert-parallel workers: threads in this process (`inprocess`,
    local communicator) or Ray actors in one placement group (`ray`, gloo or nccl), each
    bundle asking for `num_cpus`, `num_gpus` and the custom `resources`. `kv_cache_bytes`
    is per worker (the instance's KV budget is that times `workers`). With several
    workers, new prompts of at least `context_parallel_min_tokens` (0: off) are prefilled
    split over them (context-parallel prefill). `device`: where each worker runs its model
    (`auto`: its GPU if it sees one, with the FP8/FP4 weights resident, else the CPU).
    `handoff_transport` (Ray workers): how a handed-off state travels (workers/handoff.py:
    `object_store` or `collective`); in one process it is passed by reference."""
    engine_config = engine_config or EngineConfig()
    dtype = dtype or (torch.bfloat16 if torch.cuda.is_available() and device != "cpu" else default_cpu_dtype())
    t0 = time.perf_counter()
    if backend == "ray":
        bundle = {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": resources or {}}
        worker = _ray_group(checkpoint, workers, dtype, simulate_quant, communicator, ray_address, placement,
                            page_size, bundle, device, handoff_transport)  # fmt: skip
    elif workers > 1:
        worker = LocalWorkerGroup(checkpoint, workers, dtype=dtype, simulate_quant=simulate_quant, progress=progress,
                                  page_size=page_size, device=device)  # fmt: skip
    else:
        dev = serving_device(device)
        model = load_model(checkpoint, dtype=dtype, simulate_quant=simulate_quant, progress=progress,
                           resident_quant=dev.type == "cuda", device=dev)  # fmt: skip
        worker = ModelWorker(model, page_size=page_size)
    model = worker.model
    tokenizer = load_tokenizer(str(checkpoint))
    layout = KVLayout.for_model(model.cfg, elem_bytes=torch.empty(0, dtype=dtype).element_size())
    kv = KVCacheManager.from_bytes(layout, kv_cache_bytes * workers, page_size)  # kv_cache_bytes is per worker
    max_len = min(engine_config.max_model_len, model.cfg.max_position_embeddings)
    cp_min = context_parallel_min_tokens or engine_config.context_parallel_min_tokens
    config = EngineConfig(**{**engine_config.__dict__, "max_model_len": max_len, "context_parallel_min_tokens": cp_min})
    log.info(
        "model loaded (%s) in %.1fs: %d layers, %d experts, KV %.0f B/token + %.1f MiB/request, %d pages of %d tokens",
        str(dtype).removeprefix("torch."), time.perf_counter() - t0, model.cfg.num_hidden_layers,
        model.cfg.n_routed_experts, layout.bytes_per_token, layout.bytes_per_seq / 2**20, kv.num_pages, page_size,
    )  # fmt: skip
    return Engine(worker, tokenizer, kv, config, eos_id=model.cfg.eos_token_id).start()


def _ray_group(checkpoint, workers, dtype, simulate_quant, communicator, address, placement, page_size, bundle,
               device, transport):  # fmt: skip
    import ray

    from cluster.ray_backend import RayWorkerGroup

    if not ray.is_initialized():
        ray.init(address=address)
    return RayWorkerGroup(
        checkpoint, workers, dtype=str(dtype).removeprefix("torch."), simulate_quant=simulate_quant,
        num_cpus=bundle["num_cpus"], num_gpus=bundle["num_gpus"], resources=[bundle["resources"]] * workers,
        strategy="SPREAD" if placement == "spread" else "PACK", backend=communicator, page_size=page_size,
        device=device, transport=transport,
    )  # fmt: skip
