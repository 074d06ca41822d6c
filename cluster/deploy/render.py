"""`ray up` configs: the cluster a topology needs, as a pure function of the manifest.

`render_cluster`: a node type per pool, tagged with the pool's custom resources, counts
from instances x workers / GPUs per node; setup commands that install the project and
fetch its checkpoint; start commands that avoid the traps measured on real clusters
(absolute venv paths, never `ray stop`: it kills every Ray process on the machine).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from cluster.assembly.manifest import Manifest, PoolSpec
from cluster.deploy.memory import DeployError

PROVIDERS = ("aws", "gcp", "local")


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
    # One auth mode on every node and driver, or a second node cannot join (docs/machine-notes.md).
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
        cmds.append(f"cd {d} && {venv}/python -c 'from cluster.assembly.model_cache import "
                    f'ensure_preset_checkpoint as e; e("{preset}", {seed})\'')  # fmt: skip
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
