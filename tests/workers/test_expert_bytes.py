"""A worker reads only its experts: on a Flash-shaped FP8/FP4 checkpoint split over 4
workers, each reads the shared tensors plus a quarter of the expert bytes.

Oracle: the bytes of every stored tensor, from the safetensors headers, split by name
into shared and per-expert (weights and their scales).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from router.placement import ExpertPlacement
from workers.checkpoint import save_checkpoint
from workers.presets import preset_config
from workers.weights import load_model, random_weights

_ITEM_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E8M0": 1, "U8": 1, "I8": 1, "I32": 4, "I64": 8}
_EXPERT = re.compile(r"\.ffn\.experts\.(\d+)\.")


def _stored_bytes(path: Path) -> tuple[int, dict[int, int]]:
    """(shared bytes, expert id -> bytes) over every tensor in the checkpoint's files."""
    shared, per_expert = 0, {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as fh:
            for key in fh.keys():
                sl = fh.get_slice(key)
                n = _ITEM_BYTES[sl.get_dtype()] * int(torch.tensor(sl.get_shape()).prod())
                m = _EXPERT.search(key)
                if m:
                    per_expert[int(m.group(1))] = per_expert.get(int(m.group(1)), 0) + n
                else:
                    shared += n
    return shared, per_expert


def test_four_workers_each_read_a_quarter_of_the_experts(tmp_path):
    cfg = preset_config("flash-mini")
    save_checkpoint(tmp_path, cfg.to_dict(), random_weights(cfg, 0), quant="fp8-fp4")
    shared, per_expert = _stored_bytes(tmp_path)
    experts_total = sum(per_expert.values())
    assert len(per_expert) == cfg.n_routed_experts and experts_total > 0
    placement = ExpertPlacement(cfg.n_routed_experts, 4)
    full = load_model(tmp_path, dtype=torch.float32, progress=False).checkpoint_bytes_read
    assert full == shared + experts_total
    for rank in range(4):
        held = placement.local_experts(rank)
        got = load_model(tmp_path, dtype=torch.float32, progress=False, expert_ids=held).checkpoint_bytes_read
        assert got == shared + sum(per_expert[e] for e in held)
        assert abs((got - shared) / experts_total - 0.25) < 0.01, (rank, got, shared, experts_total)
