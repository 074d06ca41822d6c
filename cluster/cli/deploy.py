"""`dsv4 deploy render | check | memory`: from a topology manifest to a `ray up` config,
a verdict on a running cluster, and the memory arithmetic per GPU."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import yaml

from cluster.assembly.manifest import Manifest, load_manifest
from cluster.deploy.memory import GIB, DeployError, kv_bytes_for, manifest_memory, reference_config
from cluster.deploy.render import PROVIDERS, RenderOptions, render_cluster
from workers.config import ModelConfig
from workers.presets import ONE_M, REFERENCE_MODELS


class CheckFailed(ValueError):
    """The cluster cannot host the topology; the problems are already printed."""


USER_ERRORS: tuple[type[Exception], ...] = (DeployError, CheckFailed)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="render a `ray up` config for a topology, or check a running cluster")
    dsub = p.add_subparsers(dest="deploy_command", metavar="ACTION", required=True)

    r = dsub.add_parser(
        "render",
        help="write the `ray up` cluster config a topology needs",
        description="Node types per pool (GPU counts, custom resources), setup and start commands.",
    )
    r.add_argument("-m", "--manifest", required=True, help="topology manifest YAML")
    r.add_argument("--provider", choices=PROVIDERS, help="aws | gcp | local (default aws)")
    r.add_argument("--head-ip", help="local provider: the head machine")
    r.add_argument("--worker-ips", help="local provider: the other machines, comma-separated")
    r.add_argument("--cluster-name", help="default dsv4")
    r.add_argument("--ssh-user", help="default ubuntu")
    r.add_argument("--ssh-key", help="private key `ray up` logs in with")
    r.add_argument("--project-dir", help="the project (and its .venv) on every node (default ~/dsv4)")
    r.add_argument("--repo-url", help="git URL setup clones the project from")
    r.add_argument("--repo-ref", help="branch or tag setup checks out (default main)")
    r.add_argument("--checkpoint-repo", help="Hugging Face repo setup downloads to model.checkpoint")
    r.add_argument("--no-setup", action="store_true", help="the machines already hold the project and checkpoint")
    r.add_argument("--port", type=int, help="the head's GCS port (default: ray.address's port, else 6379)")
    r.add_argument("--num-cpus", type=int, help="local provider: logical CPUs per node (default: Ray detects)")
    r.add_argument("--object-store-bytes", type=int, help="object store size per node")
    r.add_argument("--region", help="cloud region (default us-east-1)")
    r.add_argument("--out", help="output file (default: stdout)")
    r.set_defaults(func=render_main)

    c = dsub.add_parser(
        "check",
        help="can a running Ray cluster host this topology?",
        description="GPUs, CPUs and custom resources per worker, and memory per GPU against the "
        "model's weights, KV cache and activations. Exit status 1 when it cannot.",
    )
    c.add_argument("-m", "--manifest", required=True)
    c.add_argument("--address", help="ray://host:port or host:port (default: the manifest's ray.address, or auto)")
    _add_config_flags(c)
    c.set_defaults(func=check_main)

    m = dsub.add_parser("memory", help="memory per GPU: weights, KV cache, activations")
    m.add_argument("-m", "--manifest", required=True)
    _add_config_flags(m)
    m.set_defaults(func=memory_main)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"the model's config.json, or {' | '.join(REFERENCE_MODELS)} "
                   "(default: the manifest's checkpoint or preset)")  # fmt: skip
    p.add_argument("--gpu-memory-gib", type=float, help="memory per GPU (default: from Ray's accelerator_type)")


# -- render -------------------------------------------------------------------------------
def render_options(args: argparse.Namespace, manifest: Manifest) -> RenderOptions:
    port = args.port
    if port is None:
        address = manifest.ray.address or ""
        port = int(address.rsplit(":", 1)[1]) if address.rsplit(":", 1)[-1].isdigit() else 6379
    given = {
        "provider": args.provider, "cluster_name": args.cluster_name, "head_ip": args.head_ip,
        "worker_ips": tuple(ip for ip in (args.worker_ips or "").split(",") if ip), "ssh_user": args.ssh_user,
        "ssh_private_key": args.ssh_key, "project_dir": args.project_dir, "repo_url": args.repo_url,
        "repo_ref": args.repo_ref, "checkpoint_repo": args.checkpoint_repo, "setup": not args.no_setup,
        "port": port, "num_cpus": args.num_cpus, "object_store_bytes": args.object_store_bytes, "region": args.region,
    }  # fmt: skip
    return RenderOptions(**{k: v for k, v in given.items() if v is not None})


_RENDER_FLAGS = (
    "provider",
    "head_ip",
    "worker_ips",
    "cluster_name",
    "ssh_user",
    "ssh_key",
    "project_dir",
    "repo_url",
    "repo_ref",
    "checkpoint_repo",
    "no_setup",
    "port",
    "num_cpus",
    "object_store_bytes",
    "region",
    "out",
)


def command_line(args: argparse.Namespace) -> list[str]:
    """The `deploy render` arguments that reproduce `args` (what the header records)."""
    argv = ["deploy", "render", "-m", args.manifest]
    for dest in _RENDER_FLAGS:
        value = getattr(args, dest)
        if value is True:
            argv.append("--" + dest.replace("_", "-"))
        elif value not in (None, False, ""):
            argv += ["--" + dest.replace("_", "-"), str(value)]
    return argv


def render_text(manifest_path: str, argv: list[str], config: dict) -> str:
    header = (
        f"# `ray up` cluster config for {manifest_path}, generated by:\n"
        f"#   dsv4 {shlex.join(argv)}\n"
        "# Regenerate it rather than editing it (tests/cluster/deploy/test_deploy.py checks that it is current).\n"
        "#   RAY_UP_enable_autoscaler_v2=0 ray up -y THIS.yaml   # v2 counts the head toward min_workers\n"
        "#   ray attach THIS.yaml, then: RAY_AUTH_MODE=disabled dsv4 serve -m TOPOLOGY.yaml\n"
        "#   ray down -y THIS.yaml\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False, width=120)


def render_main(args: argparse.Namespace) -> None:
    manifest = load_manifest(args.manifest)
    text = render_text(args.manifest, command_line(args), render_cluster(manifest, render_options(args, manifest)))
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)


# -- check and memory ---------------------------------------------------------------------
def model_config(manifest: Manifest, config: str | None) -> ModelConfig:
    """The model's config: --config (a file or a reference name), else the manifest's model."""
    from workers.presets import preset_config

    if config in REFERENCE_MODELS:
        return reference_config(config)
    path = Path(config) if config else None
    if path is None and manifest.model.checkpoint:
        path = Path(manifest.model.checkpoint) / "config.json"
    if path is None:
        return preset_config(manifest.model.preset or "tiny")
    if not path.is_file():
        raise DeployError(f"cannot read {path}; pass --config CONFIG.json or one of {', '.join(REFERENCE_MODELS)}")
    return ModelConfig.from_json(path)


def check_main(args: argparse.Namespace) -> None:
    from cluster.deploy.check import check_cluster, nodes_from_ray

    manifest = load_manifest(args.manifest)
    cfg = model_config(manifest, args.config)
    raw = _ray_nodes(args.address or manifest.ray.address or "auto")
    gpu_mem = args.gpu_memory_gib * GIB if args.gpu_memory_gib else None
    nodes = nodes_from_ray(raw, gpu_mem)
    report = check_cluster(manifest, cfg, nodes)
    print(f"{len(nodes)} node(s): " + "; ".join(f"{n.address} {_short(n.resources)}" for n in nodes))
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    if not report.ok:
        raise CheckFailed(f"{len(report.problems)} problem(s)")
    print(f"ok: the cluster can host {args.manifest}")


def _short(res: dict[str, float]) -> str:
    keep = {k: v for k, v in res.items() if not k.startswith(("node:", "accelerator_type")) and k not in
            ("memory", "object_store_memory")}  # fmt: skip
    return json.dumps({k: round(v, 2) for k, v in sorted(keep.items())})


def _ray_nodes(address: str) -> list[dict]:
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise DeployError(f"cannot reach a Ray cluster at {address}: {e}") from None
    try:
        return ray.nodes()
    finally:
        ray.shutdown()


def memory_main(args: argparse.Namespace) -> None:
    manifest = load_manifest(args.manifest)
    cfg = model_config(manifest, args.config)
    for pool in manifest.pools:
        mem = manifest_memory(manifest, pool, cfg)
        print(f"{manifest.pool_path(pool)} ({pool.workers} workers per instance):")
        print(f"  weights      {mem.weights / GIB:8.2f} GiB")
        print(f"  KV cache     {mem.kv / GIB:8.2f} GiB  (scheduler; one 1M-token request: "
              f"{kv_bytes_for(cfg, ONE_M) / GIB:.2f} GiB)")  # fmt: skip
        print(f"  activations  {mem.activations / GIB:8.2f} GiB  (estimate)")
        print(f"  total        {mem.total / GIB:8.2f} GiB per GPU")
        if args.gpu_memory_gib:
            print(f"  headroom     {args.gpu_memory_gib - mem.total / GIB:8.2f} GiB of {args.gpu_memory_gib:g}")
