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
from torch import nn

from workers.checkpoint import CheckpointError, CheckpointReader
from workers.config import ModelConfig
from workers.layers import Linear
from workers.model import Transformer
from workers.moe import ExpertGroup

log = logging.getLogger("dsv4.weights")

_STACKED = re.compile(r"^(?P<prefix>.*\.ffn\.experts)\.(?P<w>w[123])$")
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.ffn\.experts)\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")
_BLOCK = re.compile(r"^((?:layers|mtp)\.\d+)\.")
_FP32_KINDS = ("hc_", "attn_sink", ".ape", ".gate.bias")
# Linears whose weight a module reads directly (Attention._project_out's grouped einsum), not
# through Linear.forward: they stay dequantized (docs/model.md §8 keeps wo_a in bf16).
_READ_AS_WEIGHT = re.compile(r"(?:^|\.)attn\.wo_a$")
_Expected = tuple[tuple[int, ...], torch.dtype]


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


def load_weights(model: Transformer, path: str | Path, *, progress: bool = True, pack: bool = False) -> int:
    """Fill `model` from a checkpoint directory (only the experts the model holds are read);
    returns the bytes read from the files (also logged, and kept as `model.checkpoint_bytes_read`).

    With `pack`, layers are read one at a time and each one's FP8/FP4 weights packed
    (`pack_quantized_weights`) before the next: the dequantized tensors are written (and
    freed) a layer at a time, so pages of weights never touched cost no host memory."""
    reader = CheckpointReader(path)
    targets = model_tensors(model)
    held = set(targets)
    expected = expected_tensors(model)

    def skip(name: str) -> bool:
        return _PER_EXPERT.match(name) is not None and name not in held

    cfg = model.cfg
    for part in _by_layer(expected) if pack else [expected]:
        loaded = reader.load(part, skip=skip, progress=progress)
        with torch.no_grad():
            for name in list(loaded):
                value = loaded.pop(name)
                if name.endswith("tid2eid"):
                    _check_tid2eid(value, cfg, reader.file_of(name), name)
                targets.pop(name).copy_(value)  # popped: a packed weight's storage must not outlive it here
        _mark_quantized(model, reader.formats)
        if pack:
            pack_quantized_weights(model)
    model.checkpoint_bytes_read = reader.bytes_read
    held_experts = model.layers[0].ffn.experts.expert_ids if model.layers else []
    log.info("read %.1f MiB from %s (%d of %d routed experts)", reader.bytes_read / 2**20, path, len(held_experts),
             cfg.n_routed_experts)  # fmt: skip
    return reader.bytes_read


def _by_layer(expected: dict[str, _Expected]) -> list[dict[str, _Expected]]:
    """Split checkpoint names by block (`layers.{i}.` / `mtp.{k}.`), the rest first."""
    parts: dict[str, dict[str, _Expected]] = {"": {}}
    for name, spec in expected.items():
        m = _BLOCK.match(name)
        parts.setdefault(m[1] if m else "", {})[name] = spec
    return list(parts.values())


def pack_quantized_weights(model: nn.Module) -> int:
    """Keep only the packed form of the weights the kernels read (issue #7; docs/model.md §8): e4m3 +
    ue8m0 128x128 scales for each FP8 `Linear` with `act_quant`, packed e2m1 + ue8m0 per-32
    scales for each FP4 `ExpertGroup` (its `expert_ids` only); their dequantized copies are
    freed. The packing is the kernel path's re-quantization (exact: power-of-two scales), so
    the kernel path computes what it did, and the torch path dequantizes per call to the
    values it had. `attn.wo_a` stays dequantized: attention reads its weight directly.
    Returns the number of modules packed (already packed ones are skipped)."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module.act_quant and not module.is_packed:
            if not _READ_AS_WEIGHT.search(name):
                module.pack_fp8()
                count += 1
        elif isinstance(module, ExpertGroup) and module.weight_format == "fp4" and not module.is_packed:
            module.pack_fp4()
            count += 1
    return count


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy as held: parameters and persistent buffers (packed
    weights and scales, `tid2eid`), plus the copies the kernel path re-quantizes lazily on an
    unpacked model; not the KV pools."""
    held = sum(t.numel() * t.element_size() for t in model.state_dict(keep_vars=True).values())
    return held + sum(m.kernel_copy_bytes() for m in model.modules() if isinstance(m, (Linear, ExpertGroup)))


def _mark_quantized(model: Transformer, formats: dict[str, str]) -> None:
    """Give the GEMMs of weights stored in FP8/FP4 the official numerics (activation quant,
    docs/model.md §8) when the model simulates quantization, and tell expert groups their format."""
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
    expert_ids: list[int] | None = None, resident_quant: bool = False, device: torch.device | str | None = None,
) -> Transformer:  # fmt: skip
    """Build the model a checkpoint's config.json describes and load its weights
    (with `expert_ids`, only those routed experts are read from disk). With `resident_quant`,
    the weights the kernels read stay FP8/FP4 (`pack_quantized_weights`): the footprint a GPU
    needs; the CPU's torch path then dequantizes them per call (slower, same results)."""
    cfg = ModelConfig.from_json(Path(path) / "config.json")
    model = Transformer(cfg, dtype=dtype, simulate_quant=simulate_quant, expert_ids=expert_ids)
    load_weights(model, path, progress=progress, pack=resident_quant)
    model.lay_out_head()
    if device is not None and torch.device(device) != model.embed.weight.device:
        model.to(device)
        model.configure_kv()  # the KV pool follows the weights
    return model.eval()


def serving_device(name: str = "auto") -> torch.device:
    """Where a worker runs its model: `auto` is the GPU this process sees (a Ray worker's
    own), else the CPU; `cuda` without one is an error that says so."""
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for, but this process sees no GPU")
    return torch.device(name)


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
