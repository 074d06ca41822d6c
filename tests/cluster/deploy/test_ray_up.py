"""`ray up` for real on this machine: two loopback "machines" (127.0.0.2 head, 127.0.0.3
worker) reached over SSH, the `local` provider, a config from `dsv4 deploy render`, then
`dsv4 deploy check`, `dsv4 serve` on the cluster, a chat through its gateway, `ray down`.

What it needs (docs/machine-notes.md, `ray up`): root, Debian's openssh-server and rsync (installed
here with apt-get when missing: no mirror is a failure, not a skip), port 22 free on
127.0.0.2/.3. `ray down` runs `ray stop` on the head, which would stop every Ray process
on this shared machine: the test's sshd runs login.sh for every login, which turns that
one command into a stop of this cluster's processes only (found by its GCS address in
their command lines, plus their children). The test checks that none is left. `ray up`
leaves ~/ray_bootstrap_config.yaml and ~/ray_bootstrap_key.pem on the head (root's home
here); the test removes them when they are its own.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest

from protos import load as load_protos
from tests.cluster.processes import children_of, cluster_processes, ray_cluster_processes, stop_processes

pb, pb_grpc = load_protos()
ROOT = Path(__file__).resolve().parents[3]
VENV_BIN = Path(sys.executable).parent
HEAD, WORKER = "127.0.0.2", "127.0.0.3"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "RAY_UP_enable_autoscaler_v2": "0",
       "PYTHONPATH": str(ROOT)}  # fmt: skip

pytestmark = pytest.mark.slow


def run(cmd: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    # Output through files, not pipes: the SSH control masters `ray up` leaves for a few
    # seconds inherit its stdout, and a pipe would stay open until they exit.
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True, env=ENV, cwd=ROOT,
                                stdin=subprocess.DEVNULL)  # fmt: skip
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        out_f.seek(0)
        err_f.seek(0)
        out = subprocess.CompletedProcess(cmd, code, out_f.read(), err_f.read())
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def ensure_ssh_tools() -> None:
    if os.geteuid() != 0:
        pytest.fail("test_ray_up needs root (it installs and runs sshd)")
    if shutil.which("sshd", path="/usr/sbin:/usr/bin") and shutil.which("rsync"):
        return
    out = subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", "openssh-server", "rsync"],
        capture_output=True,
        text=True,
        timeout=180,
        env={**ENV, "DEBIAN_FRONTEND": "noninteractive"},
    )
    if out.returncode != 0:
        pytest.fail("apt-get could not install openssh-server and rsync (no reachable mirror?); `ray up` needs them:\n"
                    + out.stdout[-1500:] + out.stderr[-1500:])  # fmt: skip


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_sshd(tmp: Path) -> subprocess.Popen:
    for host in (HEAD, WORKER):
        with socket.socket() as s:
            if s.connect_ex((host, 22)) == 0:
                pytest.fail(f"something already listens on {host}:22; this test runs its own sshd there")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp / "id"], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp / "host"], check=True)
    login_script(tmp)
    (tmp / "authorized_keys").write_text(f'command="{tmp / "login.sh"}" ' + (tmp / "id.pub").read_text())
    (tmp / "sshd_config").write_text(
        f"ListenAddress {HEAD}:22\nListenAddress {WORKER}:22\nHostKey {tmp / 'host'}\n"
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        f"PidFile {tmp / 'sshd.pid'}\nMaxSessions 64\nMaxStartups 64\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", tmp / "sshd_config", "-E", tmp / "sshd.log"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((WORKER, 22)) == 0:
                return proc
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"sshd did not start:\n{(tmp / 'sshd.log').read_text()}")


def login_script(tmp: Path) -> None:
    """What every SSH login of the test runs: the requested command, except the `ray stop`
    of `ray down`, which here stops this cluster's processes only, not every Ray process
    on the machine."""
    stop = f"PYTHONPATH={ROOT} exec {sys.executable} {Path(__file__).resolve()} stop $(cat {tmp / 'cluster.marker'})"
    login = tmp / "login.sh"
    login.write_text(f'#!/bin/sh\ncase "$SSH_ORIGINAL_COMMAND" in *"(ray stop)"*) {stop};; esac\n'
                     'exec /bin/bash -c "$SSH_ORIGINAL_COMMAND"\n')  # fmt: skip
    login.chmod(0o755)


@pytest.fixture
def sshd(tmp_path):
    ensure_ssh_tools()
    tmp_path.chmod(0o700)
    proc = start_sshd(tmp_path)
    yield tmp_path
    children = children_of(proc.pid)
    proc.terminate()
    proc.wait(timeout=10)
    stop_processes(children)


def test_ray_up_two_nodes_serve_chat_down(sshd, tiny_checkpoint):
    tmp, port, cluster_name = sshd, free_port(HEAD), f"dsv4-test-{uuid.uuid4().hex[:8]}"
    marker = f"{HEAD}:{port}"
    (tmp / "cluster.marker").write_text(marker)
    manifest = tmp / "topology.yaml"
    manifest.write_text(
        f"model: {{checkpoint: {tiny_checkpoint}, dtype: float32}}\nbackend: ray\nray: {{address: '{marker}'}}\n"
        # 3 CPUs a worker, 4 a node: the two workers need both nodes.
        "instance: {workers: 2, communicator: gloo, num_cpus: 3, placement: spread}\n"
        "scheduler: {max_model_len: 256, kv_cache_gib: 0.25}\ngateway: {port: 0}\n"
    )
    config = tmp / "cluster.yaml"
    dsv4 = [sys.executable, "-m", "cluster.cli"]
    run([*dsv4, "deploy", "render", "-m", str(manifest), "--provider", "local", "--head-ip", HEAD, "--worker-ips",
         WORKER, "--ssh-user", "root", "--ssh-key", str(tmp / "id"), "--no-setup", "--project-dir", str(ROOT),
         "--num-cpus", "4", "--object-store-bytes", "150000000", "--cluster-name", cluster_name,
         "--out", str(config)])  # fmt: skip
    ray = str(VENV_BIN / "ray")
    server = None
    try:
        t0 = time.monotonic()
        run([ray, "up", "-y", "--no-config-cache", str(config)], timeout=180)
        check = None
        while time.monotonic() - t0 < 120:  # the head's autoscaler brings the worker up over SSH
            check = run([*dsv4, "deploy", "check", "-m", str(manifest)], check=False)
            if check.returncode == 0:
                break
            time.sleep(2)
        assert check is not None and check.returncode == 0, f"the worker node never joined:\n{check.stderr}"
        assert "2 node(s)" in check.stdout and "ok: the cluster can host" in check.stdout, check.stdout

        server = Server([*dsv4, "serve", "-m", str(manifest), "--port", "0"])
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            request = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="Hello")],
                                     sampling=pb.SamplingParams(max_tokens=4, seed=0))  # fmt: skip
            responses = list(stub.Chat(request, timeout=120))
            assert responses[-1].finish.finish_reason in ("stop", "length"), responses[-1]
            assert responses[-1].finish.usage.completion_tokens >= 1
            info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
            assert info.backend == "ray"
        assert server.stop() == 0, "".join(server.lines)
    finally:
        if server is not None and server.proc.poll() is None:
            server.proc.kill()
        t_down = time.monotonic()
        down = run([ray, "down", "-y", str(config)], timeout=60, check=False)
        t_down = time.monotonic() - t_down
        leftover = ours(marker, tmp)
        stop_processes(leftover)
    remove_bootstrap_files(cluster_name, tmp / "id")
    assert down.returncode == 0, f"ray down: {down.returncode} after {t_down:.0f}s\n{down.stdout[-2000:]}"
    assert not ours(marker, tmp), "processes of the cluster survived"


def remove_bootstrap_files(cluster_name: str, key: Path) -> None:
    config, pem = Path.home() / "ray_bootstrap_config.yaml", Path.home() / "ray_bootstrap_key.pem"
    if config.is_file() and f'"cluster_name": "{cluster_name}"' in config.read_text():  # JSON
        config.unlink()
    if pem.is_file() and pem.read_text() == key.read_text():
        pem.unlink()


def ours(marker: str, tmp: Path | None = None) -> list[int]:
    """This cluster's processes, and the SSH control masters that used the test's key."""
    return sorted(set(ray_cluster_processes(marker)) | (set(cluster_processes(str(tmp / "id"))) if tmp else set()))


if __name__ == "__main__" and sys.argv[1:2] == ["stop"]:  # the nodes' `ray stop` (see login_home)
    stop_processes(ours(sys.argv[2]))


class Server:
    """`dsv4 serve` as a driver of the cluster; its log is collected by a thread."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV,
                                     cwd=ROOT)  # fmt: skip
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if m := re.search(r"listening on 127\.0\.0\.1:(\d+)", "".join(self.lines)):
                self.port = int(m.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError("dsv4 serve did not start:\n" + "".join(self.lines))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)
