"""Deployment arithmetic and `ray up` configs: pure functions over a manifest.

Three questions, one module:

- **Memory per GPU** (`gpu_memory`): what one worker holds. Every worker keeps the
  attention and dense weights (data-parallel attention) and E/W routed experts, in the
  formats the GPU kernels consume (FP4 experts, FP8 block-scaled projections, fp32 where
  the model keeps fp32); its own requests' KV cache (`KVLayout` arithmetic); and one
  step's activations (an estimate, see `activation_bytes`).
- **Render** (`render_cluster`): the `ray up` config a topology needs: a node type per
  pool, tagged with the pool's custom resources, counts from instances x workers / GPUs per
  node; setup commands that install the project and fetch its checkpoint; start commands
  that avoid the traps measured in MACHINE-NOTES (absolute venv paths, no `ray stop`).
- **Check** (`check_cluster`): whether the nodes of a running cluster can host the
  topology, as `Problem`s that carry the manifest key path.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from cluster.manifest import Manifest, PoolSpec
from workers.config import ModelConfig
from workers.kv_cache import KVLayout

GIB = 2**30
PROVIDERS = ("aws", "gcp", "local")
ONE_M = 1_048_576  # tokens: V4's full context

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

# The full-size configs (SPEC-dsv4 §1), field for field as the checkpoints' config.json.
_V4_COMMON: dict[str, Any] = {
    "vocab_size": 129280, "num_attention_heads": 64, "head_dim": 512, "num_key_value_heads": 1,
    "qk_rope_head_dim": 64, "sliding_window": 128, "index_n_heads": 64, "index_head_dim": 128,
    "n_shared_experts": 1, "num_experts_per_tok": 6, "num_hash_layers": 3, "scoring_func": "sqrtsoftplus",
    "norm_topk_prob": True, "swiglu_limit": 10.0, "rms_norm_eps": 1e-6, "hc_mult": 4, "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6, "rope_theta": 10000.0, "compress_rope_theta": 160000.0, "max_position_embeddings": ONE_M,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    "num_nextn_predict_layers": 1, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
    "expert_dtype": "fp4",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
}  # fmt: skip
REFERENCE_CONFIGS: dict[str, dict[str, Any]] = {
    "v4-flash": {**_V4_COMMON, "hidden_size": 4096, "num_hidden_layers": 43, "q_lora_rank": 1024, "o_groups": 8,
                 "o_lora_rank": 1024, "compress_ratios": [0, 0, 4] + [128, 4] * 20 + [0], "index_topk": 512,
                 "n_routed_experts": 256, "moe_intermediate_size": 2048, "routed_scaling_factor": 1.5},
    "v4-pro": {**_V4_COMMON, "num_attention_heads": 128, "hidden_size": 7168, "num_hidden_layers": 61,
               "q_lora_rank": 1536, "o_groups": 16, "o_lora_rank": 1024,
               "compress_ratios": [128, 128, 4] + [128, 4] * 29 + [0], "index_topk": 1024,
               "n_routed_experts": 384, "moe_intermediate_size": 3072, "routed_scaling_factor": 2.5},
}  # fmt: skip


class DeployError(ValueError):
    """A topology that cannot be rendered (bad options, a pool no node type can hold)."""


def reference_config(name: str) -> ModelConfig:
    if name not in REFERENCE_CONFIGS:
        raise DeployError(f"unknown model {name!r}; known: {', '.join(REFERENCE_CONFIGS)}")
    return ModelConfig.from_dict(REFERENCE_CONFIGS[name])


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


# -- render: the `ray up` config ----------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    """A cloud machine type: what one node of a pool offers."""

    node_config: dict[str, Any]  # the provider's node_config
    num_gpus: int
    num_cpus: int


MACHINES: dict[str, dict[str, Machine]] = {
    "aws": {
        "gpu": Machine({"InstanceType": "p5en.48xlarge", "ImageId": "latest_dlami",
                        "BlockDeviceMappings": [{"DeviceName": "/dev/sda1",
                                                 "Ebs": {"VolumeSize": 4000, "VolumeType": "gp3"}}]}, 8, 192),
        "cpu": Machine({"InstanceType": "m7i.8xlarge", "ImageId": "latest_dlami"}, 0, 32),
    },
    "gcp": {
        "gpu": Machine({"machineType": "a3-ultragpu-8g", "scheduling": [{"onHostMaintenance": "TERMINATE"}],
                        "disks": [{"boot": True, "autoDelete": True, "type": "PERSISTENT",
                                   "initializeParams": {"diskSizeGb": 4000, "sourceImage":
                                   "projects/deeplearning-platform-release/global/images/family/common-cu124"}}]},
                       8, 224),
        "cpu": Machine({"machineType": "n2-standard-32", "disks": [{"boot": True, "autoDelete": True,
                        "type": "PERSISTENT", "initializeParams": {"diskSizeGb": 200, "sourceImage":
                        "projects/deeplearning-platform-release/global/images/family/common-cpu"}}]}, 0, 32),
    },
}  # fmt: skip


@dataclass(frozen=True)
class RenderOptions:
    provider: str = "aws"
    cluster_name: str = "dsv4"
    head_ip: str | None = None  # local provider
    worker_ips: tuple[str, ...] = ()  # local provider
    ssh_user: str = "ubuntu"
    ssh_private_key: str | None = None
    project_dir: str = "~/dsv4"  # where the project (and its .venv) lives on every node
    repo_url: str = "https://github.com/OWNER/dsv4.git"  # what setup clones
    repo_ref: str = "main"
    checkpoint_repo: str | None = None  # Hugging Face repo that setup downloads to model.checkpoint
    setup: bool = True  # False: the machines already hold the project and checkpoint
    port: int = 6379  # the head's GCS port
    num_cpus: int | None = None  # logical CPUs per node (local provider; default: Ray detects)
    object_store_bytes: int | None = None
    region: str | None = None  # default: us-east-1 (aws), us-central1 (gcp)
    gcp_project: str = "YOUR-PROJECT"


@dataclass(frozen=True)
class NodeGroup:
    """The nodes one pool needs."""

    pool: PoolSpec
    count: int  # nodes
    workers_per_node: int
    resources: dict[str, float]  # per node: CPU, GPU and the pool's custom resources


def node_groups(manifest: Manifest, gpus_per_node: int, cpus_per_node: int) -> list[NodeGroup]:
    """A group per pool: instances x workers workers, as many per node as the node holds."""
    groups = []
    for pool in manifest.pools:
        total = pool.instances * pool.workers
        if pool.num_gpus:
            per_node = int(gpus_per_node // pool.num_gpus)
        else:
            per_node = int(cpus_per_node // pool.num_cpus)
        if per_node < 1:
            what = f"{pool.num_gpus:g} GPUs" if pool.num_gpus else f"{pool.num_cpus:g} CPUs"
            raise DeployError(f"{manifest.pool_path(pool)}: a worker needs {what}; a node has "
                              f"{gpus_per_node} GPUs and {cpus_per_node} CPUs")  # fmt: skip
        per_node = min(per_node, total)
        count = math.ceil(total / per_node)
        resources = {"CPU": float(cpus_per_node), "GPU": float(gpus_per_node)}
        resources.update({name: amount * per_node for name, amount in pool.resources})
        groups.append(NodeGroup(pool, count, per_node, resources))
    return groups


def _venv(opts: RenderOptions) -> str:
    return f"{opts.project_dir}/.venv/bin"


def _env(opts: RenderOptions) -> str:
    # One auth mode on every node and driver, or a second node cannot join (MACHINE-NOTES).
    return "export RAY_AUTH_MODE=disabled OMP_NUM_THREADS=1 && ulimit -n 65536 || true; "


def setup_commands(manifest: Manifest, opts: RenderOptions) -> list[str]:
    """Install the project into `project_dir`/.venv and fetch the checkpoint."""
    if not opts.setup:
        return []
    d, venv = opts.project_dir, _venv(opts)
    cmds = [
        f"test -d {d}/.git || git clone --depth 1 --branch {opts.repo_ref} {opts.repo_url} {d}",
        f"git -C {d} fetch --depth 1 origin {opts.repo_ref} && git -C {d} checkout -q FETCH_HEAD",
        f"test -x {venv}/python || python3 -m venv {d}/.venv",
        f"{venv}/pip install -q -e {d}'[gpu]' 'huggingface_hub>=0.34'",  # ~ stays outside the quotes
        # `ray down` runs a plain `ray stop` through the login shell: put the venv on its PATH.
        f"grep -q '{venv}' ~/.bashrc || echo 'export PATH={venv}:$PATH' >> ~/.bashrc",
    ]
    model = manifest.model
    if model.checkpoint and opts.checkpoint_repo:
        cmds.append(f"test -f {model.checkpoint}/config.json || "
                    f"{venv}/hf download {opts.checkpoint_repo} --local-dir {model.checkpoint}")  # fmt: skip
    elif model.checkpoint:
        cmds.append(f"test -f {model.checkpoint}/config.json  # copy the checkpoint here on every node")
    else:
        preset, seed = model.preset or "tiny", model.seed or 0
        cmds.append(f"cd {d} && {venv}/python -c 'from cluster.model_cache import ensure_preset_checkpoint as e; "
                    f'e("{preset}", {seed})\'')  # fmt: skip
    return cmds


def _start_flags(opts: RenderOptions, resources: dict[str, float]) -> str:
    flags = ""
    if opts.num_cpus is not None:
        flags += f" --num-cpus={opts.num_cpus}"
    if opts.object_store_bytes is not None:
        flags += f" --object-store-memory={opts.object_store_bytes}"
    if resources:
        flags += " --resources='" + ", ".join(f'"{k}": {v:g}' for k, v in sorted(resources.items())).join("{}") + "'"
    return flags


def start_commands(opts: RenderOptions, custom: dict[str, float]) -> tuple[list[str], list[str]]:
    """(head, worker) start commands: the venv's `ray` by absolute path (the login shell has
    no venv) and never `ray stop` (on a shared machine it stops every Ray node there)."""
    ray = f"{_venv(opts)}/ray"
    local = opts.provider == "local"
    flags = _start_flags(opts, custom if local else {})
    head_ip = f" --node-ip-address={opts.head_ip}" if local else ""
    head = [f"{_env(opts)}{ray} start --head --port={opts.port}{head_ip} --include-dashboard=false "
            f"--autoscaling-config=~/ray_bootstrap_config.yaml{flags}"]  # fmt: skip
    # The node's own address: the one the launcher reached it at over SSH.
    own_ip = " --node-ip-address=$(echo $SSH_CONNECTION | cut -d' ' -f3)" if local else ""
    worker = [f"{_env(opts)}{ray} start --address=$RAY_HEAD_IP:{opts.port}{own_ip}{flags}"]
    return head, worker


def render_cluster(manifest: Manifest, opts: RenderOptions) -> dict[str, Any]:
    """The `ray up` config (a dict ready for YAML) for the manifest's topology."""
    if opts.provider not in PROVIDERS:
        raise DeployError(f"unknown provider {opts.provider!r}; known: {', '.join(PROVIDERS)}")
    if opts.provider == "local":
        return _render_local(manifest, opts)
    return _render_cloud(manifest, opts)


def _common(manifest: Manifest, opts: RenderOptions, custom: dict[str, float]) -> dict[str, Any]:
    head, worker = start_commands(opts, custom)
    return {
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 60,
        "file_mounts": {},
        "initialization_commands": [],
        "setup_commands": setup_commands(manifest, opts),
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": head,
        "worker_start_ray_commands": worker,
    }


def _render_cloud(manifest: Manifest, opts: RenderOptions) -> dict[str, Any]:
    machines = MACHINES[opts.provider]
    gpu = machines["gpu"] if any(p.num_gpus for p in manifest.pools) else machines["cpu"]
    groups = node_groups(manifest, gpu.num_gpus, gpu.num_cpus)
    # The head runs the gateway and the driver; GPU workers never land there (it has no GPUs).
    types: dict[str, Any] = {"head": {"resources": {}, "node_config": machines["cpu"].node_config,
                                      "min_workers": 0, "max_workers": 0}}  # fmt: skip
    for g in groups:
        types[f"{g.pool.name}_node"] = {
            "resources": {k: (int(v) if float(v).is_integer() else v) for k, v in g.resources.items()},
            "node_config": copy.deepcopy(gpu.node_config), "min_workers": g.count, "max_workers": g.count,
        }  # fmt: skip
    region = opts.region or {"aws": "us-east-1", "gcp": "us-central1"}[opts.provider]
    provider: dict[str, Any] = {"type": opts.provider, "region": region, "cache_stopped_nodes": False}
    if opts.provider == "gcp":
        provider.update(availability_zone=f"{region}-a", project_id=opts.gcp_project)
    auth: dict[str, Any] = {"ssh_user": opts.ssh_user}
    if opts.ssh_private_key:
        auth["ssh_private_key"] = opts.ssh_private_key
    return {"cluster_name": opts.cluster_name, "max_workers": sum(g.count for g in groups), "provider": provider,
            "auth": auth, "available_node_types": types, "head_node_type": "head",
            **_common(manifest, opts, {})}  # fmt: skip


def _render_local(manifest: Manifest, opts: RenderOptions) -> dict[str, Any]:
    if not opts.head_ip:
        raise DeployError("the local provider needs --head-ip (and --worker-ips for more machines)")
    customs = {tuple(p.resources) for p in manifest.pools}
    if len(customs) > 1:
        raise DeployError(
            "the local provider starts every machine alike, but the pools ask for different custom "
            "resources; start each pool's machines with its own `ray start --resources` instead"
        )
    nodes = 1 + len(opts.worker_ips)
    per_node = {name: amount * math.ceil(sum(p.instances * p.workers for p in manifest.pools) / nodes)
                for name, amount in customs.pop()}  # fmt: skip
    auth: dict[str, Any] = {"ssh_user": opts.ssh_user}
    if opts.ssh_private_key:
        auth["ssh_private_key"] = opts.ssh_private_key
    provider = {"type": "local", "head_ip": opts.head_ip, "worker_ips": list(opts.worker_ips)}
    return {"cluster_name": opts.cluster_name, "provider": provider, "auth": auth,
            "min_workers": len(opts.worker_ips), "max_workers": len(opts.worker_ips),
            **_common(manifest, opts, per_node)}  # fmt: skip
