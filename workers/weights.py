"""Checkpoint names <-> model parameters: what a model expects, loading it, and random
weights in the official layout for `dsv4 init-model`.

Routed experts live stacked in the model (`ffn.experts.w1` [E_local, I, d]) and
per expert in the checkpoint (`ffn.experts.{e}.w1.weight`); everything else has the
same name in both.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch

from workers.checkpoint import CheckpointError, CheckpointReader
from workers.config import ModelConfig
from workers.layers import Linear
from workers.model import Transformer

log = logging.getLogger("dsv4.weights")

_STACKED = re.compile(r"^(?P<prefix>.*\.ffn\.experts)\.(?P<w>w[123])$")
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.ffn\.experts)\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")
_FP32_KINDS = ("hc_", "attn_sink", ".ape", ".gate.bias")


def model_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Checkpoint name -> the model tensor (or stacked-expert slice) it loads into."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        m = _STACKED.match(name)
        if m is None:
            out[name] = tensor
            continue
        group = model.get_submodule(m["prefix"])
        for k, e in enumerate(group.expert_ids):
            out[f"{m['prefix']}.{e}.{m['w']}.weight"] = tensor[k]
    return out


def expected_tensors(model: Transformer) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Checkpoint name -> (logical shape, dtype to load as)."""
    return {name: (tuple(t.shape), t.dtype) for name, t in model_tensors(model).items()}


def load_weights(model: Transformer, path: str | Path, *, progress: bool = True) -> int:
    """Fill `model` from a checkpoint directory (only the experts the model holds are read);
    returns the bytes read from the files (also logged, and kept as `model.checkpoint_bytes_read`)."""
    reader = CheckpointReader(path)
    targets = model_tensors(model)

    def skip(name: str) -> bool:
        return _PER_EXPERT.match(name) is not None and name not in targets

    loaded = reader.load(expected_tensors(model), skip=skip, progress=progress)
    cfg = model.cfg
    with torch.no_grad():
        for name, value in loaded.items():
            if name.endswith("tid2eid"):
                _check_tid2eid(value, cfg, reader.file_of(name), name)
            targets[name].copy_(value)
    model.checkpoint_bytes_read = reader.bytes_read
    _mark_quantized(model, reader.formats)
    held = model.layers[0].ffn.experts.expert_ids if model.layers else []
    log.info("read %.1f MiB from %s (%d of %d routed experts)", reader.bytes_read / 2**20, path, len(held),
             cfg.n_routed_experts)  # fmt: skip
    return reader.bytes_read


def _mark_quantized(model: Transformer, formats: dict[str, str]) -> None:
    """Give the GEMMs of weights stored in FP8/FP4 the official numerics (activation quant,
    SPEC §8) when the model simulates quantization, and tell expert groups their format."""
    for name, kind in formats.items():
        if kind not in ("fp8", "fp4"):
            continue
        m = _PER_EXPERT.match(name)
        if m is not None:
            group = model.get_submodule(m["prefix"])
            group.weight_format, group.act_quant = kind, model.simulate_quant
        elif name.endswith(".weight"):
            module = model.get_submodule(name.removesuffix(".weight"))
            if isinstance(module, Linear):
                module.act_quant = model.simulate_quant


def _check_tid2eid(value: torch.Tensor, cfg: ModelConfig, file: str, name: str) -> None:
    if value.numel() and (value.min() < 0 or value.max() >= cfg.n_routed_experts):
        raise CheckpointError(
            f"{file}: tensor {name!r} holds expert ids outside [0, {cfg.n_routed_experts})"
        )


def load_model(
    path: str | Path, *, dtype: torch.dtype = torch.bfloat16, simulate_quant: bool = True, progress: bool = True,
    expert_ids: list[int] | None = None,
) -> Transformer:  # fmt: skip
    """Build the model a checkpoint's config.json describes and load its weights
    (with `expert_ids`, only those routed experts are read from disk)."""
    cfg = ModelConfig.from_json(Path(path) / "config.json")
    model = Transformer(cfg, dtype=dtype, simulate_quant=simulate_quant, expert_ids=expert_ids)
    load_weights(model, path, progress=progress)
    return model.eval()


def random_weights(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in checkpoint names and dtypes (bf16 matrices, fp32 mHC/sink/ape/bias,
    int32 `tid2eid`), scaled so activations stay finite and vary through every layer."""
    with torch.device("meta"):
        shapes = expected_tensors(Transformer(cfg, dtype=torch.bfloat16))
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        shape, _ = shapes[name]
        out[name] = _random_tensor(name, shape, cfg, gen)
    return out


def _random_tensor(name: str, shape: tuple[int, ...], cfg: ModelConfig, gen: torch.Generator) -> torch.Tensor:
    def normal(std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std + mean

    leaf = name.rsplit(".", 1)[-1]
    if leaf == "tid2eid":
        ranks = torch.rand(shape[0], cfg.n_routed_experts, generator=gen).argsort(dim=-1)
        return ranks[:, : shape[1]].to(torch.int32)
    if "hc_" in name:
        if leaf.endswith("_fn"):
            t = normal(1.0 / math.sqrt(shape[-1]))
        elif leaf.endswith("_base"):
            t = normal(0.5)
        else:
            t = torch.rand(shape, generator=gen) + 0.5
        return t.float()
    if any(k in name for k in _FP32_KINDS):
        return normal(1.0 if "attn_sink" in name else 0.5 if ".ape" in name else 0.1).float()
    if "norm" in leaf or name.endswith("norm.weight"):
        return normal(0.1, 1.0).bfloat16()
    if name == "embed.weight":
        return normal(1.0).bfloat16()
    return normal(1.0 / math.sqrt(shape[-1])).bfloat16()
