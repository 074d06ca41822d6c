"""Manifest v0: loading, defaults, and every error with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.assembly.manifest import Manifest, ManifestError, load_manifest, parse_manifest
from cluster.cli.main import main

REPO = Path(__file__).resolve().parents[3]


def test_defaults():
    m = parse_manifest(None)
    assert m == Manifest() == parse_manifest({})
    assert (m.version, m.backend, m.model.source, m.model.dtype, m.model.simulate_quant) == (
        0, "inprocess", "tiny-seed0", "auto", True
    )  # fmt: skip
    s = m.scheduler
    assert (s.max_batch_tokens, s.max_running, s.max_waiting, s.page_size) == (512, 64, 1024, 128)
    assert s.kv_bytes == 2 << 30
    assert (s.handoff_failure, s.handoff_timeout_s) == ("recompute", 30.0)
    assert (m.gateway.host, m.gateway.port, m.gateway.metrics_port) == ("127.0.0.1", 50051, None)


def test_shipped_manifest_loads():
    m = load_manifest(REPO / "manifests" / "local-inprocess.yaml")
    assert m.model.preset == "tiny" and m.model.seed == 0 and m.model.source == "tiny-seed0"
    assert m.scheduler.kv_bytes == 2 << 30 and m.scheduler.max_model_len == 65536
    assert m.gateway.metrics_port == 9400


def test_shipped_ray_manifest_loads():
    m = load_manifest(REPO / "manifests" / "ray-local.yaml")
    assert m.backend == "ray" and m.communicator == "gloo" and m.instance.workers == 2
    assert m.ray.address == "127.0.0.2:6380" and m.instance.placement == "spread"


def test_topology_refused_before_start(tiny_checkpoint):
    from cluster.assembly.build import check_topology
    from cluster.assembly.manifest import ManifestError, parse_manifest

    check_topology(parse_manifest({"instance": {"workers": 4}}), tiny_checkpoint)  # 8 experts / 4
    with pytest.raises(ManifestError, match=r"instance\.workers: 8 routed experts cannot be split evenly over 3"):
        check_topology(parse_manifest({"instance": {"workers": 3}}), tiny_checkpoint)
    with pytest.raises(ManifestError, match=r"pools\.colocated\.workers: 8 routed experts .* over 16"):
        check_topology(parse_manifest({"pools": {"colocated": {"instances": 2, "workers": 16}}}), tiny_checkpoint)
    check_topology(parse_manifest({"pools": {"prefill": {}, "decode": {"workers": 2}}}), tiny_checkpoint)
    with pytest.raises(ManifestError, match=r"pools\.decode\.workers: 8 routed experts .* over 3"):
        check_topology(parse_manifest({"pools": {"prefill": {}, "decode": {"workers": 3}}}), tiny_checkpoint)
    with pytest.raises(ManifestError, match=r"scheduler\.page_size: must be a multiple of 128 .* got 64"):
        check_topology(parse_manifest({"scheduler": {"page_size": 64}}), tiny_checkpoint)


def test_full_manifest(tmp_path):
    text = """
version: 0
model: {checkpoint: /models/v4, dtype: float32, simulate_quant: false}
backend: inprocess
scheduler: {max_batch_tokens: 256, max_running: 8, max_waiting: 16, max_model_len: 4096,
            kv_cache_bytes: 1000000, page_size: 16}
gateway: {host: 0.0.0.0, port: 0, metrics_port: 9100}
"""
    path = tmp_path / "m.yaml"
    path.write_text(text)
    m = load_manifest(path)
    assert m.model.checkpoint == "/models/v4" and m.model.source == "/models/v4" and m.model.dtype == "float32"
    assert not m.model.simulate_quant
    assert (m.scheduler.max_batch_tokens, m.scheduler.kv_bytes, m.scheduler.page_size) == (256, 1000000, 16)
    assert (m.gateway.host, m.gateway.port, m.gateway.metrics_port) == ("0.0.0.0", 0, 9100)
    with pytest.raises(AttributeError):
        m.gateway.port = 1  # frozen


def test_handoff_timeout_reaches_the_engines(tiny_checkpoint):
    from cluster.assembly.build import boot

    raw = {"model": {"checkpoint": str(tiny_checkpoint), "dtype": "float32"}, "pools": {"prefill": {}, "decode": {}},
           "scheduler": {"handoff_timeout_s": 2.5, "kv_cache_gib": 0.25}}  # fmt: skip
    assert parse_manifest(raw).scheduler.handoff_timeout_s == 2.5
    router, _ = boot(parse_manifest(raw))
    try:
        assert [e.config.handoff_timeout_s for e in router.engines] == [2.5, 2.5]
    finally:
        router.stop(drain=False, timeout=5)


def test_kv_cache_gib():
    assert parse_manifest({"scheduler": {"kv_cache_gib": 0.5}}).scheduler.kv_bytes == 1 << 29


ERRORS = [
    ({"schedular": {}},
     "schedular: unknown key; known keys: version, model, backend, instance, pools, ray, scheduler, gateway"),
    ({"scheduler": {"max_batch_tokens": 0}}, "scheduler.max_batch_tokens: must be >= 1, got 0"),
    ({"scheduler": {"max_batch_tokens": "many"}}, "scheduler.max_batch_tokens: must be an integer, got 'many'"),
    ({"scheduler": {"max_running": True}}, "scheduler.max_running: must be an integer, got True"),
    ({"scheduler": {"max_waiting": -1}}, "scheduler.max_waiting: must be >= 1, got -1"),
    ({"scheduler": {"max_model_len": 1}}, "scheduler.max_model_len: must be >= 2, got 1"),
    ({"scheduler": {"page_size": 0}}, "scheduler.page_size: must be >= 1, got 0"),
    ({"scheduler": {"kv_cache_bytes": 0}}, "scheduler.kv_cache_bytes: must be >= 1, got 0"),
    ({"scheduler": {"kv_cache_gib": -2}}, "scheduler.kv_cache_gib: must be > 0, got -2"),
    ({"scheduler": {"handoff_timeout_s": 0}}, "scheduler.handoff_timeout_s: must be > 0, got 0"),
    ({"scheduler": {"handoff_timeout_s": "1m"}}, "scheduler.handoff_timeout_s: must be a number, got '1m'"),
    ({"scheduler": {"handoff_failure": "retry"}},
     "scheduler.handoff_failure: must be one of recompute, fail, got 'retry'"),
    ({"scheduler": {"kv_cache_gib": 1, "kv_cache_bytes": 5}}, "scheduler: give kv_cache_bytes or kv_cache_gib"),
    ({"scheduler": {"chunk": 3}}, "scheduler.chunk: unknown key; known keys: max_batch_tokens"),
    ({"scheduler": [1, 2]}, "scheduler: must be a mapping, got list"),
    ({"model": {"preset": "huge"}}, "model.preset: must be one of tiny, small"),
    ({"model": {"checkpoint": "/x", "preset": "tiny"}}, "model: give checkpoint or preset, not both"),
    ({"model": {"checkpoint": "/x", "seed": 1}}, "model.seed: applies to a preset only"),
    ({"model": {"checkpoint": ""}}, "model.checkpoint: must be a non-empty string, got ''"),
    ({"model": {"seed": -1}}, "model.seed: must be >= 0, got -1"),
    ({"model": {"dtype": "float16"}}, "model.dtype: must be one of auto, bfloat16, float32, got 'float16'"),
    ({"model": {"simulate_quant": "yes"}}, "model.simulate_quant: must be true or false, got 'yes'"),
    ({"model": {"weights": "/x"}}, "model.weights: unknown key"),
    ({"backend": "slurm"}, "backend: must be one of inprocess, ray, got 'slurm'"),
    ({"instance": {"workers": 0}}, "instance.workers: must be >= 1, got 0"),
    ({"instance": {"communicator": "mpi"}}, "instance.communicator: must be one of local, gloo, nccl, got 'mpi'"),
    ({"instance": {"communicator": "gloo"}}, "instance.communicator: the inprocess backend uses local, got 'gloo'"),
    ({"backend": "ray", "instance": {"communicator": "local"}},
     "instance.communicator: the ray backend needs gloo or nccl, got 'local'"),
    ({"instance": {"placement": "everywhere"}}, "instance.placement: must be one of pack, spread, got 'everywhere'"),
    ({"version": 1}, "version: must be one of 0, got 1"),
    ({"gateway": {"port": 70000}}, "gateway.port: must be <= 65535, got 70000"),
    ({"gateway": {"port": -1}}, "gateway.port: must be >= 0, got -1"),
    ({"gateway": {"metrics_port": "x"}}, "gateway.metrics_port: must be an integer, got 'x'"),
    ({"gateway": {"host": 5}}, "gateway.host: must be a non-empty string, got 5"),
    ({"gateway": {"cors": True}}, "gateway.cors: unknown key; known keys: host, port, metrics_port"),
    ({"gateway": {"tls": True}}, "gateway.tls: must be a mapping, got bool"),
    ({"gateway": {"tls": {"cert": "c.pem"}}}, "gateway.tls: needs both cert and key"),
    ({"gateway": {"max_request_bytes": 10}}, "gateway.max_request_bytes: must be >= 1024, got 10"),
    ([1, 2], "must be a mapping, got list"),
    ({"pools": {"fast": {"workers": 2}}}, "pools.fast.role: missing; one of colocated, prefill, decode"),
    ({"pools": {"prefill": {}}}, "pools: prefill and decode pools come together"),
    ({"pools": {"colocated": {}, "decode": {}}}, "pools: a colocated pool serves alone"),
    ({"pools": {"colocated": {"instances": 0}}}, "pools.colocated.instances: must be >= 1, got 0"),
    ({"pools": {"colocated": {"gpus": 1}}}, "pools.colocated.gpus: unknown key"),
    ({"backend": "ray", "pools": {"decode": {"resources": {"GPU": 1}}, "prefill": {}}},
     "pools.decode.resources.GPU: use num_cpus / num_gpus"),
    ({"backend": "ray", "pools": {"prefill": {"num_gpus": -1}, "decode": {}}},
     "pools.prefill.num_gpus: must be a number >= 0, got -1"),
    ({"pools": {"colocated": {"communicator": "gloo"}}},
     "pools.colocated.communicator: the inprocess backend uses local, got 'gloo'"),
    ({"pools": {"colocated": {"resources": {"node_a": 1}}}},
     "pools.colocated.resources: num_gpus and resources place Ray actors"),
    ({"instance": {"workers": 2}, "pools": {"colocated": {}}}, "pools: give pools or instance, not both"),
    ({"pools": []}, "pools: must be a non-empty mapping"),
    ({"pools": {"prefill": {"context_parallel_min_tokens": -1}, "decode": {}}},
     "pools.prefill.context_parallel_min_tokens: must be >= 0, got -1"),
    ({"scheduler": {"handoff_transport": "rdma"}}, "scheduler.handoff_transport: must be one of"),
    ({"model": {"device": "tpu"}}, "model.device: must be one of"),
]


def test_handoff_transport_auto_is_collective_only_where_every_pool_uses_nccl():
    def transport(pre: str, dec: str, chosen: str = "auto") -> str:
        raw = {"backend": "ray", "scheduler": {"handoff_transport": chosen},
               "pools": {"prefill": {"communicator": pre}, "decode": {"communicator": dec}}}  # fmt: skip
        return parse_manifest(raw).handoff_transport

    assert transport("nccl", "nccl") == "collective"
    assert transport("nccl", "gloo") == transport("gloo", "gloo") == "object_store"
    assert transport("gloo", "gloo", "collective") == "collective"
    assert transport("nccl", "nccl", "object_store") == "object_store"
    assert parse_manifest({}).model.device == "auto"


def test_pools_and_the_instance_shorthand():
    one = parse_manifest({"instance": {"workers": 2}})
    assert [(p.name, p.role, p.instances, p.workers) for p in one.pools] == [("colocated", "colocated", 1, 2)]
    assert one.pool_path(one.pools[0]) == "instance"
    raw = {"backend": "ray", "pools": {
        "prefill": {"instances": 2, "workers": 8, "num_gpus": 1, "resources": {"prefill": 1}},
        "decoders": {"role": "decode", "workers": 16, "num_gpus": 1, "communicator": "nccl"}}}  # fmt: skip
    m = parse_manifest(raw)
    pre, dec = m.pools
    assert (pre.name, pre.role, pre.instances, pre.workers, pre.num_gpus, pre.resources) == (
        "prefill", "prefill", 2, 8, 1.0, (("prefill", 1.0),))  # fmt: skip
    assert (dec.name, dec.role, dec.context_parallel_min_tokens) == ("decoders", "decode", 0)
    assert (m.communicator_of(dec), m.communicator_of(pre)) == ("nccl", "gloo")
    assert m.pool_path(dec) == "pools.decoders"


@pytest.mark.parametrize(("raw", "message"), ERRORS, ids=[m.split(":")[0] or "top" for _, m in ERRORS])
def test_errors_carry_the_key_path(raw, message):
    with pytest.raises(ManifestError) as e:
        parse_manifest(raw)
    assert str(e.value).startswith(message), str(e.value)
    assert e.value.path == message.split(":")[0] if ":" in message else e.value.path == ""


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"scheduler": {"max_batch_tokens": 0}}))
    with pytest.raises(ManifestError, match=r"^scheduler\.max_batch_tokens: must be >= 1, got 0 \(in .*bad\.yaml\)$"):
        load_manifest(path)
    path.write_text("model: [unclosed\n")
    with pytest.raises(ManifestError, match="bad.yaml: not valid YAML"):
        load_manifest(path)
    with pytest.raises(ManifestError, match="no such file"):
        load_manifest(tmp_path / "missing.yaml")


def test_empty_file_is_all_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_manifest(path) == Manifest()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "--port: must be <= 65535, got 70000"),
        (["--metrics-port", "-1"], "--metrics-port: must be >= 0, got -1"),
        (["-m", "/nonexistent.yaml"], "/nonexistent.yaml: no such file"),
    ],
)
def test_serve_flag_errors_exit_2_before_loading(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert f"dsv4 serve: error: {message}" in err and "Traceback" not in err


def test_flags_override_the_manifest(tmp_path):
    from argparse import Namespace

    from cluster.cli.serve import resolve_manifest

    path = tmp_path / "m.yaml"
    path.write_text("model: {preset: small, seed: 3}\ngateway: {port: 1234, metrics_port: 9000}\n")
    args = Namespace(manifest=str(path), host="0.0.0.0", port=0, metrics_port=None, checkpoint="/ckpt", preset=None)
    m = resolve_manifest(args)
    assert (m.gateway.host, m.gateway.port, m.gateway.metrics_port) == ("0.0.0.0", 0, 9000)
    assert (m.model.checkpoint, m.model.preset, m.model.seed) == ("/ckpt", None, None)


def test_device_cuda_without_a_gpu_says_so():
    import torch

    from workers.weights import serving_device

    gpu = torch.cuda.is_available()
    assert serving_device("auto") == torch.device("cuda" if gpu else "cpu")
    assert serving_device("cpu") == torch.device("cpu")
    if gpu:
        assert serving_device("cuda").type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="sees no GPU"):
            serving_device("cuda")


def test_strict_output_format_is_a_gateway_setting():
    assert parse_manifest(None).gateway.strict_output_format is False
    assert parse_manifest({"gateway": {"strict_output_format": True}}).gateway.strict_output_format is True
    with pytest.raises(ManifestError, match=r"gateway\.strict_output_format: must be true or false"):
        parse_manifest({"gateway": {"strict_output_format": "yes"}})
