"""Building engine instances for tests the way the assembly does, from a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.assembly.build import build_instance
from cluster.assembly.manifest import parse_manifest
from cluster.engine.engine import Engine


def instance(checkpoint: str | Path, *, workers: int = 1, simulate_quant: bool = True, cp_min_tokens: int = 0,
             **scheduler: Any) -> Engine:  # fmt: skip
    """One started in-process float32 instance of `checkpoint` with `workers` expert-parallel
    workers; `scheduler` overrides the manifest's scheduler keys (the prefix cache is off
    unless asked for)."""
    manifest = parse_manifest({
        "model": {"dtype": "float32", "simulate_quant": simulate_quant},
        "instance": {"workers": workers, "context_parallel_min_tokens": cp_min_tokens},
        "scheduler": {"prefix_cache": False, **scheduler},
    })  # fmt: skip
    return build_instance(manifest, checkpoint=Path(checkpoint))
