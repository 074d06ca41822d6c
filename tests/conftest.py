"""Shared fixtures: a tiny random checkpoint written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.checkpoint import save_checkpoint
from workers.presets import preset_config
from workers.weights import random_weights

# One intra-op thread: the suite shares 2 cores with servers and Ray workers it starts,
# and oversubscribed OpenMP barriers make small decode steps 10x slower.
torch.set_num_threads(1)


def _tiny(tmp_path_factory: pytest.TempPathFactory, quant: str) -> Path:
    out = tmp_path_factory.mktemp(f"tiny-{quant}")
    cfg = preset_config("tiny")
    save_checkpoint(out, cfg.to_dict(), random_weights(cfg, seed=0), quant=quant, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` preset, seed 0, bf16 weights (what `dsv4 init-model --preset tiny` writes)."""
    return _tiny(tmp_path_factory, "none")


@pytest.fixture(scope="session")
def quantized_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset stored as the FP4 release is: FP8 linears, FP4 routed experts."""
    return _tiny(tmp_path_factory, "fp8-fp4")
