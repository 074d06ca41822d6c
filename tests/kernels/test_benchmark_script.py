"""benchmarks/kernels.py runs as a plain script: on CPU it times nothing, and `--smoke` checks every
benchmark case at toy shapes through the interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.kernels.helpers import requires_triton

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the script would time for minutes")
def test_without_cuda_nothing_is_timed() -> None:
    done = _run()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no CUDA device: nothing to time"


@requires_triton
def test_smoke_checks_every_case() -> None:
    done = _run("--smoke")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines()[1:] if line.strip()]
    assert len(rows) == 18 and all(" ok " in line for line in rows), done.stdout


def test_gpu_model_check_runs_on_cpu_with_the_references(tmp_path, monkeypatch) -> None:
    """benchmarks/gpu_model_check.py (the model on a GPU through the kernels) runs its every
    step on CPU with the references, so the prepared GPU call does not fail on the script."""
    import importlib.util
    import json

    path = SCRIPT.parent / "gpu_model_check.py"
    spec = importlib.util.spec_from_file_location("gpu_model_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("DSV4_KERNELS", "ref")  # restored after the test (the script sets it on CPU)
    out = tmp_path / "r.json"
    argv = ["--device", "cpu", "--batch", "2", "--context", "256", "--steps", "1", "--out", str(out)]
    assert module.main(argv) == 0
    r = json.loads(out.read_text())
    strict = r["none: fp32 kernels vs cpu"]
    assert strict["same_argmax"] == 1.0 and strict["max_abs_diff"] < 1e-3
    assert r["fp8-fp4: fp32 kernels vs cpu"]["same_argmax"] >= 0.95
    assert r["none: fp32 torch path on device vs cpu"]["max_abs_diff"] == 0.0
    assert set(r["decode"]) == {"fp32", "bf16"} and all(v["kernels_ms"] > 0 for v in r["decode"].values())
    serving = r["serving"]  # on the CPU the run on "the device" is the CPU run itself: equal tokens
    assert serving["handoff_equals_kept"] is True and serving["same_tokens_as_cpu"] == 1.0
    assert {u: len(t) for u, t in serving["tokens"].items()} == {"greedy": 7, "seeded": 7}
