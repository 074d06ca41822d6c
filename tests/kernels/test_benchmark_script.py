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
    assert len(rows) == 17 and all(" ok " in line for line in rows), done.stdout
