"""`dsv4 status` and `dsv4 drain` against a real `dsv4 serve` subprocess and a real client:
after Drain, new Chat/Generate calls get UNAVAILABLE and health NOT_SERVING, while the
request already running finishes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2

from protos import load as load_protos
from tests.cluster.gateway.test_server import Server, chat, free_port, generate

pb, pb_grpc = load_protos()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def dsv4(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=60)  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    manifest = tmp_path_factory.mktemp("ops") / "m.yaml"
    manifest.write_text(f"model: {{checkpoint: {tiny_checkpoint}}}\nscheduler: {{max_model_len: 256, "
                        "kv_cache_gib: 0.25}\n")  # fmt: skip
    s = Server("-m", str(manifest), "--metrics-port", str(free_port()))
    yield s
    assert s.stop() == 0


def test_status_reports_load_and_rates(server):
    list(server.stub.Chat(chat("Hello", max_tokens=4, seed=1), timeout=60))
    out = dsv4("status", "--target", f"127.0.0.1:{server.port}", "--interval", "0.2")
    assert out.returncode == 0, out.stderr
    assert "backend inprocess" in out.stdout and "DRAINING" not in out.stdout
    assert "pool colocated (colocated): 1 instance(s)" in out.stdout
    assert "totals: 1 requests" in out.stdout and "KV 0/" in out.stdout


def test_status_shows_an_instance_that_is_rebuilding():
    from cluster.cli.ops import format_status

    workers = [pb.WorkerInfo(instance=0, rank=r, node="127.0.0.2") for r in range(2)]
    pool = pb.PoolInfo(name="colocated", role="colocated", num_instances=2, workers=workers,
                       instance_states=["serving", "rebuilding"])  # fmt: skip
    info = pb.ServerInfo(backend="ray", uptime_s=10, pools=[pool])
    lines = format_status(info, info)
    assert "  instance 0: rank 0 on 127.0.0.2, rank 1 on 127.0.0.2" in lines
    assert "  instance 1 (REBUILDING): no workers" in lines


def test_status_of_nothing_is_a_clear_error():
    out = dsv4("status", "--target", f"127.0.0.1:{free_port()}")
    assert out.returncode == 2 and "cannot reach a dsv4 gateway" in out.stderr


def test_drain_refuses_new_requests_and_finishes_running_ones(server):
    running = server.stub.Chat(chat("Tell me a long story", max_tokens=48, ignore_eos=True, seed=2), timeout=120)
    first = next(running)  # admitted and streaming
    rest: list = []
    reader = threading.Thread(target=lambda: rest.extend(running))
    reader.start()

    out = dsv4("drain", "--target", f"127.0.0.1:{server.port}")
    assert out.returncode == 0 and "draining" in out.stdout, out.stderr
    for call in (lambda: list(server.stub.Chat(chat("Hi", max_tokens=2), timeout=30)),
                 lambda: list(server.stub.Generate(generate(max_tokens=2), timeout=30))):  # fmt: skip
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "server is draining" in e.value.details()
    health = server.health.Check(health_pb2.HealthCheckRequest(service="dsv4.v1.Inference")).status
    assert health == health_pb2.HealthCheckResponse.NOT_SERVING

    reader.join(timeout=120)
    finish = rest[-1].finish
    assert finish.finish_reason == "length" and finish.usage.completion_tokens == 48, [first, *rest][-1]
    waited = dsv4("drain", "--target", f"127.0.0.1:{server.port}", "--wait", "30")
    assert waited.returncode == 0 and "already draining" in waited.stdout and "idle" in waited.stdout
    info = server.stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.draining and info.load.running == 0
    assert "DRAINING" in dsv4("status", "--target", f"127.0.0.1:{server.port}", "--interval", "0").stdout
