"""Deployment arithmetic: pure functions over a manifest and a model config.

- **Memory per GPU** (`gpu_memory`): what one worker holds. Every worker keeps the
  attention and dense weights (data-parallel attention) and E/W routed experts, in the
  formats the GPU kernels consume (FP4 experts, FP8 block-scaled projections, fp32 where
  the model keeps fp32); its own requests' KV cache (`KVLayout` arithmetic); and one
  step's activations (an estimate, see `activation_bytes`).

The `ray up` configs are rendered in render.py, a running cluster checked in check.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.assembly.manifest import Manifest, PoolSpec
from workers.config import ModelConfig
from workers.kv_cache import KVLayout
from workers.presets import REFERENCE_MODELS, full_size_config

GIB = 2**30

# Bytes per element of each storage format (scales included).
FORMATS = {
    "fp4": 0.5 + 1 / 32,  # e2m1 pairs + one e8m0 scale per 32
    "fp8": 1 + 1 / (128 * 128),  # e4m3 + one e8m0 scale per 128x128 block
    "bf16": 2.0,
    "fp32": 4.0,
    "int32": 4.0,
}
# GPU memory by Ray's `accelerator_type:*` resource (what nvidia-smi reports).
GPU_MEMORY = {"H200": 143771 * 2**20, "H100": 81559 * 2**20, "A100": 81920 * 2**20, "B200": 183359 * 2**20}

class DeployError(ValueError):
    """A topology that cannot be rendered (bad options, a pool no node type can hold)."""


def reference_config(name: str) -> ModelConfig:
    """A full-size model by name (workers/presets.py `REFERENCE_MODELS`); DeployError lists the known ones."""
    if name not in REFERENCE_MODELS:
        raise DeployError(f"unknown model {name!r}; known: {', '.join(REFERENCE_MODELS)}")
    return full_size_config(name)


# -- weights ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorGroup:
    """Tensors of one kind: `numel` elements in all, stored as `fmt`."""

    kind: str  # e.g. "attn.wq_b"
    numel: int
    fmt: str  # a key of FORMATS
    routed: bool = False  # routed experts: split over the workers

    @property
    def nbytes(self) -> float:
        return self.numel * FORMATS[self.fmt]


def _block_tensors(cfg: ModelConfig, layer: int) -> list[TensorGroup]:
    """One decoder block (main or MTP): attention, compressors, indexer, mHC, MoE."""
    d, h, hd, n = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.hc_mult
    q, g, inter, e = cfg.q_lora_rank, cfg.o_groups, cfg.moe_intermediate_size, cfg.n_routed_experts
    mix = (2 + n) * n
    out = [
        TensorGroup("attn.wq_a", q * d, "fp8"), TensorGroup("attn.wq_b", h * hd * q, "fp8"),
        TensorGroup("attn.wkv", hd * d, "fp8"), TensorGroup("attn.wo_a", g * cfg.o_lora_rank * h * hd // g, "bf16"),
        TensorGroup("attn.wo_b", d * g * cfg.o_lora_rank, "fp8"),
        TensorGroup("attn.small", h + q + hd + 2 * d, "fp32"),  # sink, q/kv/attn/ffn norms
        TensorGroup("mhc", 2 * (mix * n * d + mix + 3), "fp32"),
        TensorGroup("ffn.gate", e * d + (0 if layer < cfg.num_hash_layers else e), "fp32"),  # weight, bias
        TensorGroup("ffn.shared", cfg.n_shared_experts * 3 * inter * d, "fp8"),
        TensorGroup("ffn.experts", e * 3 * inter * d, "fp4", routed=True),
    ]  # fmt: skip
    if layer < cfg.num_hash_layers:
        out.append(TensorGroup("ffn.gate.tid2eid", cfg.vocab_size * cfg.num_experts_per_tok, "int32"))
    r = cfg.compress_ratio(layer)
    if r:
        out += _compressor(cfg, r, hd, "attn.compressor")
    if r == 4:
        ci, ni = cfg.index_head_dim, cfg.index_n_heads
        out += [TensorGroup("attn.indexer.wq_b", ni * ci * q, "fp8"), TensorGroup("attn.indexer.proj", ni * d, "bf16")]
        out += _compressor(cfg, 4, ci, "attn.indexer.compressor")
    return out


def _compressor(cfg: ModelConfig, ratio: int, width: int, kind: str) -> list[TensorGroup]:
    coff = 2 if ratio == 4 else 1
    numel = ratio * coff * width + 2 * coff * width * cfg.hidden_size + width  # ape, wkv + wgate, norm
    return [TensorGroup(kind, numel, "fp32")]


def weight_tensors(cfg: ModelConfig) -> list[TensorGroup]:
    """Every weight of the model (MTP blocks included), grouped by kind and format."""
    d, n, v = cfg.hidden_size, cfg.hc_mult, cfg.vocab_size
    out = [TensorGroup("embed", v * d, "bf16"), TensorGroup("head", v * d, "fp32"),
           TensorGroup("final", n * n * d + n + 1 + d, "fp32")]  # fmt: skip
    for layer in range(cfg.num_hidden_layers):
        out += _block_tensors(cfg, layer)
    for k in range(cfg.num_nextn_predict_layers):
        out += _block_tensors(cfg, cfg.num_hidden_layers + k)
        out += [TensorGroup("mtp.proj", 2 * d * d, "fp8"), TensorGroup("mtp.head", n * n * d + n + 1 + 3 * d, "fp32")]
    return out


@dataclass(frozen=True)
class WeightBytes:
    replicated: float  # on every worker: attention, dense and shared-expert weights, embeddings, head
    experts: float  # all routed experts, all layers (split over an instance's workers)

    def per_worker(self, workers: int) -> float:
        return self.replicated + self.experts / workers


def weight_bytes(cfg: ModelConfig) -> WeightBytes:
    groups = weight_tensors(cfg)
    return WeightBytes(sum(t.nbytes for t in groups if not t.routed), sum(t.nbytes for t in groups if t.routed))


# -- activations and the whole budget -----------------------------------------------------
def activation_bytes(cfg: ModelConfig, num_tokens: int, context: int, num_seqs: int, workers: int) -> float:
    """An upper estimate of one step's live activations on one worker.

    `num_tokens` tokens in the step (max_batch_tokens), attending over `context` tokens,
    `num_seqs` sequences sampled (max_running). Terms: the mHC residual streams in and out
    (fp32), q and the attention output (bf16), the indexer's scores over the 4x keys
    (fp32, after the head reduction: the kernel never holds per-head scores), the MoE
    receive buffer with 2x headroom for imbalance (tokens, then 2 intermediate rows, bf16),
    and the final logits (fp32). KV is read in place by the attention kernel, not gathered.
    """
    d, n = cfg.hidden_size, cfg.hc_mult
    streams = 2 * num_tokens * n * d * 4
    attention = 2 * num_tokens * cfg.num_attention_heads * cfg.head_dim * 2
    indexer = num_tokens * math.ceil(context / 4) * 4
    received = 2 * num_tokens * cfg.num_experts_per_tok  # rows: the average is num_tokens * k per worker
    moe = received * (d + 2 * cfg.moe_intermediate_size) * 2
    logits = num_seqs * cfg.vocab_size * 4
    return float(streams + attention + indexer + moe + logits)


@dataclass(frozen=True)
class GpuMemory:
    """One worker's memory, in bytes."""

    weights: float
    kv: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.kv + self.activations


def gpu_memory(cfg: ModelConfig, workers: int, kv_bytes: float, num_tokens: int, context: int,
               num_seqs: int) -> GpuMemory:  # fmt: skip
    acts = activation_bytes(cfg, num_tokens, context, num_seqs, workers)
    return GpuMemory(weight_bytes(cfg).per_worker(workers), float(kv_bytes), acts)


def kv_bytes_for(cfg: ModelConfig, num_tokens: int) -> float:
    """One request's KV state at `num_tokens` tokens (bf16 cache rows)."""
    return KVLayout.for_model(cfg).bytes_for(num_tokens)


def manifest_memory(manifest: Manifest, pool: PoolSpec, cfg: ModelConfig) -> GpuMemory:
    """A pool worker's memory under the manifest's scheduler limits."""
    sched = manifest.scheduler
    context = min(sched.max_model_len, cfg.max_position_embeddings)
    return gpu_memory(cfg, pool.workers, sched.kv_bytes, sched.max_batch_tokens, context, sched.max_running)
