"""What machine a benchmark ran on, and whether other work shared its cores."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    """What a benchmark ran on and with: versions, CPU, threads, commit, load average."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "dtype": args.dtype,
        "decode_tokens": args.decode_tokens, "repeats": args.repeats, "commit": commit or "?",
        "loadavg_start": os.getloadavg()[0],
    }  # fmt: skip


def busy_warning(load: float, threads: int) -> str | None:
    """A note when other work already holds the cores this benchmark wants."""
    cores = os.cpu_count() or 1
    if load + threads > cores + 0.5:
        return (f"note: 1-min load average {load:.1f} on {cores} cores with {threads} threads here: "
                "the machine is shared, timings are noisy (compare ratios; see also the best-of table)")  # fmt: skip
    return None
