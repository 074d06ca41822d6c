"""`dsv4 deploy`: the weight / KV / activation arithmetic against the model itself, the
`ray up` configs render produces (and that the shipped ones are current), and the check
of a cluster's nodes against a topology."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from cluster.assembly.manifest import load_manifest, parse_manifest
from cluster.cli import deploy as cmd_deploy
from cluster.cli.main import main
from cluster.deploy.check import NodeInfo, check_cluster, nodes_from_ray
from cluster.deploy.memory import (
    GIB,
    DeployError,
    kv_bytes_for,
    manifest_memory,
    reference_config,
    weight_bytes,
    weight_tensors,
)
from cluster.deploy.render import RenderOptions, render_cluster
from workers.model import Transformer
from workers.presets import ONE_M, PRESETS, preset_config
from workers.weights import expected_tensors

ROOT = Path(__file__).resolve().parents[3]
MANIFESTS = ROOT / "manifests"
H200 = 143771 * 2**20


# -- arithmetic ---------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_weight_inventory_matches_the_model(preset):
    """Element counts per kind (routed experts; the rest by the model's dtype) equal those
    of the tensors a model of this config loads."""
    cfg = preset_config(preset)
    with torch.device("meta"):
        tensors = expected_tensors(Transformer(cfg, dtype=torch.bfloat16))
    model: dict[str, int] = {}
    for name, (shape, dtype) in tensors.items():
        key = "routed" if re.search(r"\.experts\.\d+\.", name) else str(dtype)
        model[key] = model.get(key, 0) + math.prod(shape)
    ours: dict[str, int] = {}
    as_dtype = {"fp8": "torch.bfloat16", "bf16": "torch.bfloat16", "fp32": "torch.float32", "int32": "torch.int64"}
    for t in weight_tensors(cfg):
        key = "routed" if t.routed else as_dtype[t.fmt]
        ours[key] = ours.get(key, 0) + t.numel
    assert ours == model


def test_full_size_models_have_their_published_size():
    flash, pro = reference_config("v4-flash"), reference_config("v4-pro")
    # docs/model.md §1: Flash 284.3B main model, Pro 1573B main + 26B MTP
    assert 284e9 < sum(t.numel for t in weight_tensors(flash)) < 292e9
    assert 1.59e12 < sum(t.numel for t in weight_tensors(pro)) < 1.61e12
    published = ROOT / "tests" / "data" / "reference-config-v4-pro.json"  # V4-Pro's own config.json
    from workers.config import ModelConfig

    assert ModelConfig.from_dict(json.loads(published.read_text())) == pro


def test_kv_at_1m_tokens_by_hand():
    pro = reference_config("v4-pro")
    # 30 CSA layers: 512-d entry per 4 tokens + 128-d indexer key per 4; 31 HCA: 512-d per 128; bf16
    per_token = 30 * (512 * 2 / 4 + 128 * 2 / 4) + 31 * (512 * 2 / 128)
    assert per_token == 9848
    assert kv_bytes_for(pro, ONE_M) == pytest.approx(per_token * ONE_M, rel=0.01)


def test_memory_per_gpu_of_the_shipped_topologies():
    flash = load_manifest(MANIFESTS / "flash-2x8xH200.yaml")
    mem = manifest_memory(flash, flash.pools[0], reference_config("v4-flash"))
    w = weight_bytes(reference_config("v4-flash"))
    assert mem.weights == pytest.approx(w.replicated + w.experts / 16)
    assert 19 * GIB < mem.weights < 22 * GIB and mem.kv == 64 * GIB
    assert mem.total < H200
    pro = load_manifest(MANIFESTS / "pro-4x8xH200.yaml")
    for pool in pro.pools:
        mem = manifest_memory(pro, pool, reference_config("v4-pro"))
        assert 80 * GIB < mem.weights < 86 * GIB and mem.total < H200


# -- render -------------------------------------------------------------------------------
def test_render_pro_on_aws_tags_pool_nodes():
    config = render_cluster(load_manifest(MANIFESTS / "pro-4x8xH200.yaml"), RenderOptions(provider="aws"))
    types = config["available_node_types"]
    assert set(types) == {"head", "prefill_node", "decode_node"}
    assert types["prefill_node"]["resources"] == {"CPU": 192, "GPU": 8, "prefill": 8}
    assert types["decode_node"]["min_workers"] == types["decode_node"]["max_workers"] == 2
    assert "GPU" not in types["head"]["resources"] and config["max_workers"] == 4
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("~/dsv4/.venv/bin/ray start" in c and "ray stop" not in c for c in starts)
    assert any("hf download" not in c and "pip install" in c for c in config["setup_commands"])


def test_render_counts_nodes_from_instances_and_workers():
    manifest = parse_manifest({"backend": "ray", "pools": {"decode": {"instances": 3, "workers": 4, "num_gpus": 1},
                                                           "prefill": {"workers": 2, "num_gpus": 2}}})  # fmt: skip
    types = render_cluster(manifest, RenderOptions(provider="gcp"))["available_node_types"]
    assert types["decode_node"]["min_workers"] == 2  # 12 GPUs on 8-GPU nodes
    assert types["prefill_node"]["min_workers"] == 1


def test_render_local_needs_a_head_and_one_resource_set():
    manifest = parse_manifest({"backend": "ray", "instance": {"workers": 2, "resources": {"tagged": 1}}})
    with pytest.raises(DeployError, match="--head-ip"):
        render_cluster(manifest, RenderOptions(provider="local"))
    config = render_cluster(manifest, RenderOptions(provider="local", head_ip="10.0.0.1", worker_ips=("10.0.0.2",)))
    assert config["provider"] == {"type": "local", "head_ip": "10.0.0.1", "worker_ips": ["10.0.0.2"]}
    assert "available_node_types" not in config  # the local provider refuses them
    assert """--resources='{"tagged": 1}'""" in config["worker_start_ray_commands"][0]
    assert "SSH_CONNECTION" in config["worker_start_ray_commands"][0]
    pd = parse_manifest({"backend": "ray", "pools": {"prefill": {"resources": {"prefill": 1}},
                                                     "decode": {"resources": {"decode": 1}}}})  # fmt: skip
    with pytest.raises(DeployError, match="different custom resources"):
        render_cluster(pd, RenderOptions(provider="local", head_ip="10.0.0.1"))


@pytest.mark.parametrize("name", ["cluster-aws-h200.yaml", "cluster-local.yaml"])
def test_shipped_cluster_configs_are_current(name, tmp_path):
    """Each shipped `ray up` config says how it was rendered; rendering again gives it back."""
    text = (MANIFESTS / name).read_text()
    argv = shlex.split(re.search(r"^#   dsv4 (deploy render .*)$", text, re.M).group(1))
    out = tmp_path / name
    argv[argv.index("--out") + 1] = str(out)
    assert main(argv) == 0
    assert yaml.safe_load(out.read_text()) == yaml.safe_load(text)


# -- check --------------------------------------------------------------------------------
def gpu_node(ip: str, tag: str, gpus: int = 8, accel: str = "H200") -> dict:
    res = {"CPU": 192.0, "GPU": float(gpus), tag: 8.0, f"accelerator_type:{accel}": 1.0, f"node:{ip}": 1.0}
    return {"Alive": True, "NodeManagerAddress": ip, "Resources": res}


def pro_nodes(**kw) -> list[NodeInfo]:
    raw = [gpu_node("10.0.0.1", "prefill", **kw), gpu_node("10.0.0.2", "prefill", **kw),
           gpu_node("10.0.0.3", "decode", **kw), gpu_node("10.0.0.4", "decode", **kw)]  # fmt: skip
    return nodes_from_ray([{"Alive": True, "NodeManagerAddress": "10.0.0.9", "Resources": {"CPU": 32.0}}, *raw])


def test_check_accepts_the_cluster_it_was_rendered_for():
    report = check_cluster(load_manifest(MANIFESTS / "pro-4x8xH200.yaml"), reference_config("v4-pro"), pro_nodes())
    assert report.ok, report.problems


def test_check_names_the_key_of_each_problem():
    pro, cfg = load_manifest(MANIFESTS / "pro-4x8xH200.yaml"), reference_config("v4-pro")
    short = check_cluster(pro, cfg, pro_nodes()[:-1])  # one decode node missing
    paths = {p.path for p in short.problems}
    assert {"pools.decode.num_gpus", "pools.decode.resources.decode"} <= paths, short.problems
    assert "16 workers x 1 decode = 16 decode needed; the cluster has 8" in str(short.problems)
    small = check_cluster(pro, cfg, pro_nodes(accel="H100"))  # 80 GB GPUs: the weights alone do not fit
    assert [p.path for p in small.problems] == ["pools.prefill.workers", "pools.decode.workers"], small.problems
    tiny_kv = parse_manifest({"backend": "ray", "scheduler": {"kv_cache_gib": 1}, "instance": {"num_gpus": 1}})
    report = check_cluster(tiny_kv, cfg, pro_nodes())
    assert [p.path for p in report.problems] == ["scheduler.kv_cache_gib", "instance.workers"]
    inproc = check_cluster(parse_manifest(None), cfg, pro_nodes())
    assert [p.path for p in inproc.problems] == ["backend"]


def test_check_packs_all_workers():
    manifest = parse_manifest({"backend": "ray", "instance": {"workers": 2, "num_cpus": 3}})
    nodes = [NodeInfo("a", {"CPU": 4.0}), NodeInfo("b", {"CPU": 2.0})]
    report = check_cluster(manifest, preset_config("tiny"), nodes)
    assert [p.path for p in report.problems] == ["instance"] and "do not pack" in report.problems[0].message


def test_check_cli_exits_non_zero(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cmd_deploy, "_ray_nodes", lambda address: [gpu_node("10.0.0.1", "prefill")])
    argv = ["deploy", "check", "-m", str(MANIFESTS / "pro-4x8xH200.yaml"), "--config", "v4-pro"]
    assert main(argv) != 0
    assert "problem: pools.prefill.num_gpus" in capsys.readouterr().err
    monkeypatch.setattr(
        cmd_deploy,
        "_ray_nodes",
        lambda address: [gpu_node(f"10.0.0.{i}", t) for i, t in enumerate(["prefill"] * 2 + ["decode"] * 2)],
    )
    assert main(argv) == 0
    assert "ok: the cluster can host" in capsys.readouterr().out
