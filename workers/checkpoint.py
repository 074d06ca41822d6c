"""Reading and writing checkpoints in the official DeepSeek-V4 layout (docs/model.md §9).

A checkpoint directory holds `config.json` and either one `model.safetensors` or shards listed
in `model.safetensors.index.json` ({"metadata": {"total_size": N}, "weight_map": {name: file}}).
Tensor names have no `model.` prefix. An FP8 or FP4 weight `<base>.weight` has a sibling ue8m0
scale `<base>.scale` (older releases: `<base>.weight_scale_inv`); the reader hides scales and
hands out dequantized logical tensors. Formats are in `kernels.quant`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from kernels.quant import (
    FP4_WEIGHT_BLOCK,
    dequant_fp4_weight,
    dequant_fp8_weight,
    quant_fp4_weight,
    quant_fp8_weight,
)
from workers.errors import CheckpointError  # noqa: F401  (re-exported: workers.checkpoint.CheckpointError)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIXES = (".scale", ".weight_scale_inv")
QUANT_MODES = ("none", "fp8", "fp8-fp4")
HF_QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
    "scale_fmt": "ue8m0", "weight_block_size": [128, 128],
}
# 2-D weights stored as FP8 (block 128x128) by quant="fp8"; works under `layers.{i}.` and `mtp.{k}.`.
_FP8_WEIGHT = re.compile(
    r"(?:^|\.)(?:attn\.(?:wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b"
    r"|ffn\.shared_experts\.w[123]|ffn\.experts\.\d+\.w[123])\.weight$"
    r"|^mtp\.\d+\.(?:e_proj|h_proj)\.weight$"
)
_ROUTED_EXPERT_WEIGHT = re.compile(r"(?:^|\.)ffn\.experts\.\d+\.w[123]\.weight$")
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_INT_DTYPES = {"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64"}
_E8M0_DTYPES = {"F8_E8M0", "U8"}

Expected = Mapping[str, tuple[tuple[int, ...], torch.dtype | None]]



def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{what}: missing file {path}") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{what}: cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {path} does not hold a JSON object")
    return data


def _open(path: Path, tensor: str | None) -> AbstractContextManager[Any]:
    """safe_open(path) lazily (header only), turning any failure into a CheckpointError."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ...
        what = f"tensor {tensor}: " if tensor else ""
        raise CheckpointError(f"{what}cannot open {path}: {exc}") from exc


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _first(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class CheckpointReader:
    """Lazy reader of an official-layout checkpoint directory: config, index, dequantizing load."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.config: dict[str, Any] = _read_json(self.path / CONFIG_FILE, "checkpoint config")
        self._files = self._read_layout()  # stored key -> file (weights and scales)
        self._scale_of = self._find_scales()  # weight key -> its scale key
        self._hidden = set(self._scale_of.values())
        self._names = [k for k in self._files if k not in self._hidden]
        self.bytes_read = 0  # stored bytes (weights + scales) read from the files so far
        self.formats: dict[str, str] = {}  # name -> how it was stored: 'fp8', 'fp4' or 'cast' (loaded so far)

    def _read_layout(self) -> dict[str, Path]:
        index = self.path / INDEX_FILE
        if index.exists():
            weight_map = _read_json(index, "checkpoint index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"checkpoint index {index} has no 'weight_map' object")
            files = {str(k): self.path / str(v) for k, v in weight_map.items()}
            first_in: dict[Path, str] = {}
            for name, file in files.items():
                first_in.setdefault(file, name)
            for file, name in first_in.items():
                if not file.is_file():
                    raise CheckpointError(f"tensor {name}: index {index} names missing shard {file}")
            return files
        single = self.path / SINGLE_FILE
        if not single.is_file():
            raise CheckpointError(f"checkpoint {self.path}: neither {INDEX_FILE} nor {SINGLE_FILE} exists")
        with _open(single, None) as fh:
            return {k: single for k in fh.keys()}

    def _find_scales(self) -> dict[str, str]:
        scales = {}
        for key in self._files:
            for suffix in SCALE_SUFFIXES:
                weight = key.removesuffix(suffix) + ".weight"
                if key.endswith(suffix) and weight in self._files:
                    scales[weight] = key
        return scales

    def names(self) -> list[str]:
        """Logical tensor names in the checkpoint (scales hidden)."""
        return list(self._names)

    def file_of(self, name: str) -> str:
        """Path of the safetensors file that holds tensor `name`."""
        if name not in self._files:
            raise CheckpointError(f"tensor {name} not found in checkpoint {self.path}")
        return str(self._files[name])

    def load(
        self,
        expected: Expected,
        *,
        dtype: torch.dtype = torch.float32,
        skip: Callable[[str], bool] | None = None,
        strict: bool = False,
        progress: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Load, dequantize, check and cast the tensors in `expected` that `skip` does not reject.

        `expected[name] = (logical_shape, target_dtype)`; a target dtype of None means `dtype`.
        FP8 (e4m3 + block scale) and FP4 (packed e2m1 + per-32 scale) weights are dequantized in
        float32 first. Skipped tensors are never read. With `strict`, checkpoint tensors neither
        expected nor skipped are an error. Returns {name: tensor} in `expected` order; the tensors
        own their memory (never views of the file).
        """
        wanted = [n for n in expected if not (skip and skip(n))]
        self._check_present(wanted)
        if strict:
            self._check_no_extra(expected, skip)
        by_file: dict[Path, list[str]] = {}
        for name in sorted(wanted):
            by_file.setdefault(self._files[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        with tqdm(total=len(wanted), desc="loading", unit="tensor", disable=not progress, leave=False) as bar:
            for file, names in sorted(by_file.items()):
                with _open(file, names[0]) as fh:
                    for name in names:
                        shape, target = expected[name]
                        out[name] = self._load_one(fh, file, name, tuple(shape), target or dtype)
                        bar.update()
        return {n: out[n] for n in wanted}

    def _check_present(self, wanted: list[str]) -> None:
        missing = [n for n in wanted if n not in self._files or n in self._hidden]
        if missing:
            where = self.path / (INDEX_FILE if (self.path / INDEX_FILE).exists() else SINGLE_FILE)
            raise CheckpointError(
                f"{len(missing)} expected tensor(s) missing from {where}: {_first(missing)}"
            )

    def _check_no_extra(self, expected: Expected, skip: Callable[[str], bool] | None) -> None:
        extra = [n for n in self._names if n not in expected and not (skip and skip(n))]
        if extra:
            files = sorted({self._files[n].name for n in extra})
            raise CheckpointError(f"{len(extra)} unexpected tensor(s) in {_first(files)}: {_first(extra)}")

    def _load_one(
        self, fh: Any, file: Path, name: str, shape: tuple[int, ...], target: torch.dtype
    ) -> torch.Tensor:
        stored, stored_shape = _header(fh, file, name)
        scale_key = self._scale_of.get(name)
        kind = _kind(stored, scale_key is not None, target, name, file)
        self.formats[name] = kind
        logical = list(stored_shape)
        if kind == "fp4" and stored != "F4":  # int8/uint8 bytes hold two e2m1 values each
            logical[-1] *= 2
        if tuple(logical) != shape:
            raise CheckpointError(f"tensor {name} in {file}: shape {tuple(logical)} != expected {shape}")
        if kind == "cast":
            return _cast(self._read(fh, file, name), target, name, file)
        assert scale_key is not None
        scale = self._read_scale(fh, file, scale_key, kind, shape)
        data = self._read(fh, file, name)
        if kind == "fp8":
            return dequant_fp8_weight(data, scale).to(target)
        return dequant_fp4_weight(data, scale).to(target)

    def _read_scale(self, fh: Any, file: Path, key: str, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
        scale_file = self._files[key]
        if scale_file != file:
            with _open(scale_file, key) as other:
                return self._read_scale(other, scale_file, key, kind, shape)
        stored, stored_shape = _header(fh, file, key)
        if len(shape) != 2:
            raise CheckpointError(f"tensor {key} in {file}: quantized weight must be 2-D, got {shape}")
        out_dim, in_dim = shape
        if kind == "fp8":
            ok = stored in _E8M0_DTYPES | _FLOAT_DTYPES
            want: tuple[int, ...] = (_ceil_div(out_dim, 128), _ceil_div(in_dim, 128))
        else:
            ok = stored in _E8M0_DTYPES
            want = (out_dim, in_dim // FP4_WEIGHT_BLOCK)
            if in_dim % FP4_WEIGHT_BLOCK:
                raise CheckpointError(f"tensor {key} in {file}: FP4 in-dim {in_dim} is not a multiple of 32")
        if not ok:
            raise CheckpointError(f"tensor {key} in {file}: unsupported {kind} scale dtype {stored}")
        if stored_shape != want:
            raise CheckpointError(f"tensor {key} in {file}: {kind} scale shape {stored_shape} != {want}")
        return self._read(fh, file, key)

    def _read(self, fh: Any, file: Path, name: str) -> torch.Tensor:
        t = _read(fh, file, name)
        self.bytes_read += t.numel() * t.element_size()
        return t


def _header(fh: Any, file: Path, name: str) -> tuple[str, tuple[int, ...]]:
    """(safetensors dtype string, header shape) without reading data."""
    try:
        sl = fh.get_slice(name)
        return sl.get_dtype(), tuple(sl.get_shape())
    except Exception as exc:
        raise CheckpointError(f"tensor {name}: not readable from {file}: {exc}") from exc


def _read(fh: Any, file: Path, name: str) -> torch.Tensor:
    try:
        return fh.get_tensor(name)
    except Exception as exc:
        raise CheckpointError(f"tensor {name}: cannot read data from {file}: {exc}") from exc


def _kind(stored: str, has_scale: bool, target: torch.dtype, name: str, file: Path) -> str:
    """How to turn a stored tensor into the target dtype: 'cast', 'fp8' or 'fp4'."""
    if target.is_floating_point:
        if stored in _FLOAT_DTYPES:
            return "cast"
        if stored == "F8_E4M3" and has_scale:
            return "fp8"
        if (stored in ("I8", "U8", "F4")) and has_scale:
            return "fp4"
    elif stored in _INT_DTYPES:
        return "cast"
    why = " (quantized weight without a .scale)" if stored in ("F8_E4M3", "F4") else ""
    raise CheckpointError(f"tensor {name} in {file}: stored dtype {stored} cannot load as {target}{why}")


def _cast(t: torch.Tensor, target: torch.dtype, name: str, file: Path) -> torch.Tensor:
    if not target.is_floating_point and t.numel() and target != torch.bool:
        info = torch.iinfo(target)
        if t.min().item() < info.min or t.max().item() > info.max:
            raise CheckpointError(f"tensor {name} in {file}: values do not fit {target}")
    # safetensors hands out tensors backed by the file's mmap; copy so that the result owns its
    # memory and survives the file being rewritten or truncated.
    return t.to(target, copy=True)


# ---------------------------------------------------------------------------- writing

def quant_format(name: str, quant_mode: str) -> str | None:
    """Storage format of tensor `name` under `quant_mode`: 'fp8', 'fp4' or None (as given)."""
    if quant_mode not in QUANT_MODES:
        raise ValueError(f"unknown quant mode {quant_mode!r}; known: {', '.join(QUANT_MODES)}")
    if quant_mode == "none" or not _FP8_WEIGHT.search(name):
        return None
    if quant_mode == "fp8-fp4" and _ROUTED_EXPERT_WEIGHT.search(name):
        return "fp4"
    return "fp8"


def _stored_nbytes(t: torch.Tensor, fmt: str | None) -> int:
    if fmt is None:
        return t.numel() * t.element_size()
    out_dim, in_dim = t.shape
    if fmt == "fp8":
        return t.numel() + _ceil_div(out_dim, 128) * _ceil_div(in_dim, 128)
    return t.numel() // 2 + t.numel() // FP4_WEIGHT_BLOCK


def _encode(name: str, t: torch.Tensor, fmt: str | None) -> dict[str, torch.Tensor]:
    """One logical tensor -> the stored tensors (weight, plus `.scale` when quantized)."""
    if fmt is None:
        t = t.detach()
        # safetensors refuses views that share storage; copy only those.
        return {name: t.contiguous() if t.untyped_storage().nbytes() == t.nbytes else t.clone()}
    if t.dim() != 2 or (fmt == "fp4" and t.shape[1] % FP4_WEIGHT_BLOCK):
        need = "2-D" if fmt == "fp8" else "2-D with in % 32 == 0"
        raise CheckpointError(f"tensor {name}: {fmt} needs a {need} weight, got shape {tuple(t.shape)}")
    base = name.removesuffix(".weight")
    if fmt == "fp8":
        q, scale = quant_fp8_weight(t.detach())
    else:
        packed, scale = quant_fp4_weight(t.detach())
        q = packed.view(torch.int8)  # the official release stores FP4 bytes as int8
    return {name: q, base + ".scale": scale}


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split in the given order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _quantized_config(config: Mapping[str, Any], quant_mode: str) -> dict[str, Any]:
    cfg = json.loads(json.dumps(dict(config)))
    if quant_mode == "none":
        cfg.pop("quantization_config", None)
    else:
        cfg["quantization_config"] = dict(HF_QUANTIZATION_CONFIG)
    cfg["expert_dtype"] = "fp4" if quant_mode == "fp8-fp4" else None
    return cfg


def save_checkpoint(
    out_dir: str | os.PathLike[str],
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    quant: str = "none",
    max_shard_bytes: int = 2**30,
    progress: bool = True,
) -> None:
    """Write `tensors` (logical, unquantized) and `config` in the official layout under `out_dir`.

    quant: 'none' (as given), 'fp8' (FP8 e4m3 + ue8m0 128x128 `.scale` for the linears listed in
    `_FP8_WEIGHT`), 'fp8-fp4' (as fp8, but routed experts FP4 packed as int8 + ue8m0 [out, in/32]).
    Shards `model-0000i-of-0000N.safetensors` of at most ~max_shard_bytes each and
    `model.safetensors.index.json` are always written; only one shard is quantized at a time.
    """
    formats = {name: quant_format(name, quant) for name in tensors}
    for name, fmt in formats.items():
        scale_name = name.removesuffix(".weight") + ".scale"
        if fmt is not None and scale_name in tensors:
            raise CheckpointError(f"tensor {scale_name}: collides with the scale written for {name}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {name: _stored_nbytes(t, formats[name]) for name, t in tensors.items()}
    shards = _plan_shards(sizes, max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    with tqdm(total=len(tensors), desc="saving", unit="tensor", disable=not progress, leave=False) as bar:
        for i, names in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            stored: dict[str, torch.Tensor] = {}
            for name in names:
                stored.update(_encode(name, tensors[name], formats[name]))
                bar.update()
            save_file(stored, str(out / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(stored, file))
            total += sum(t.numel() * t.element_size() for t in stored.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    cfg = _quantized_config(config, quant)
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
