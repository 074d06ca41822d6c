"""Fixtures shared by the cluster tests: a real two-node Ray cluster on loopback addresses
(one per test module that asks for it), stopped with the module by its own processes' PIDs
(never `ray stop`: it would stop every Ray process on the machine)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.cluster.processes import ray_cluster_processes, stop_processes


def _ray_cli() -> str:
    exe = shutil.which("ray", path=str(Path(os.sys.executable).parent)) or shutil.which("ray")
    assert exe, "the ray CLI is not installed"
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    port, temp = _free_port(), tmp_path_factory.mktemp("ray")
    common = ["--num-cpus=3", "--object-store-memory=150000000", "--disable-usage-stats"]
    ray_cli = _ray_cli()
    subprocess.run([ray_cli, "start", "--head", "--node-ip-address=127.0.0.2", f"--port={port}",
                    f"--temp-dir={temp}", "--include-dashboard=false", '--resources={"node_a": 2}', *common],
                   env=env, check=True, capture_output=True, timeout=120)  # fmt: skip
    try:
        subprocess.run([ray_cli, "start", f"--address=127.0.0.2:{port}", "--node-ip-address=127.0.0.3",
                        '--resources={"node_b": 2}', *common],
                       env=env, check=True, capture_output=True, timeout=120)  # fmt: skip
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address=f"127.0.0.2:{port}")
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()
        stop_processes(ray_cluster_processes(f"127.0.0.2:{port}"))
        assert not ray_cluster_processes(f"127.0.0.2:{port}"), "processes of the test's Ray cluster survived"




@pytest.fixture(scope="module")
def groups(ray_cluster, tiny_checkpoint):
    """A prefill instance of 2 Ray actors (one per node) and a decode instance of 1 on node b,
    kept for the module (float32, no quantization simulation)."""
    from cluster.backends.ray_group import RayWorkerGroup

    def group(resources):
        return RayWorkerGroup(tiny_checkpoint, len(resources), dtype="float32", simulate_quant=False, num_cpus=1,
                              resources=resources, step_timeout=60)  # fmt: skip

    prefill, decode = group([{"node_a": 1}, {"node_b": 1}]), group([{"node_b": 1}])
    yield prefill, decode
    for g in (prefill, decode):
        g.stop()
