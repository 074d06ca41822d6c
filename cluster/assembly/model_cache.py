"""Random preset checkpoints made on first use in a cache directory ($DSV4_CACHE or ~/.cache/dsv4)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from workers.checkpoint import save_checkpoint
from workers.presets import preset_config
from workers.weights import random_weights

log = logging.getLogger("dsv4")


def cache_dir() -> Path:
    return Path(os.environ.get("DSV4_CACHE", Path.home() / ".cache" / "dsv4"))


def ensure_preset_checkpoint(preset: str, seed: int = 0) -> Path:
    """The directory of preset `preset` with `seed`; written (atomically) if missing."""
    out = cache_dir() / "models" / f"{preset}-seed{seed}"
    if (out / "model.safetensors.index.json").is_file():
        return out
    cfg = preset_config(preset)
    log.info("creating the %r model (random weights, seed %d) in %s — first run only", preset, seed, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{preset}-", dir=out.parent))
    try:
        save_checkpoint(tmp, cfg.to_dict(), random_weights(cfg, seed))
        try:
            tmp.rename(out)
        except OSError:  # another process won the race; use its copy
            if not (out / "model.safetensors.index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
