"""Checkpoint layout (workers/checkpoint.py): save/load round trips, lazy expert reads, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import workers.checkpoint as ckpt
from workers.checkpoint import CheckpointError, CheckpointReader, save_checkpoint

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
CONFIG = {"hidden_size": 32, "num_hidden_layers": 1, "expert_dtype": "fp4", "quantization_config": {"x": 1}}
FP8_NAMES = {
    "layers.0.attn.wq_a.weight", "layers.0.attn.wkv.weight", "layers.0.attn.indexer.wq_b.weight",
    "layers.0.ffn.shared_experts.w1.weight", "mtp.0.e_proj.weight", "mtp.0.attn.wo_b.weight",
}
EXPERT_NAMES = {f"layers.0.ffn.experts.{e}.w{k}.weight" for e in range(3) for k in (1, 2, 3)}
EXPERT_NAMES |= {"mtp.0.ffn.experts.0.w2.weight"}


def _shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "embed.weight": (40, 32), "head.weight": (40, 32), "norm.weight": (32,),
        "layers.0.attn.wq_a.weight": (48, 32), "layers.0.attn.wkv.weight": (130, 200),
        "layers.0.attn.compressor.wkv.weight": (16, 32), "layers.0.attn.indexer.wq_b.weight": (64, 48),
        "layers.0.attn.indexer.weights_proj.weight": (4, 32), "layers.0.attn_norm.weight": (32,),
        "layers.0.ffn.shared_experts.w1.weight": (64, 32), "mtp.0.e_proj.weight": (32, 32),
        "mtp.0.attn.wo_b.weight": (32, 64), "mtp.0.ffn.experts.0.w2.weight": (32, 64),
    }
    for e in range(3):
        for k, shape in ((1, (64, 32)), (2, (32, 64)), (3, (64, 32))):
            shapes[f"layers.0.ffn.experts.{e}.w{k}.weight"] = shape
    return shapes


def _float32_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "layers.0.hc_attn_fn": torch.randn(24, 128, generator=gen),
        "layers.0.attn.attn_sink": torch.randn(4, generator=gen),
        "layers.0.ffn.gate.bias": torch.randn(3, generator=gen),
    }


def _random_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {n: (torch.randn(s, generator=gen) / 4).bfloat16() for n, s in _shapes().items()}
    out |= _float32_tensors(gen)
    out["layers.0.ffn.gate.tid2eid"] = torch.randint(0, 3, (40, 2), generator=gen, dtype=torch.int32)
    return out


def _representable_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Values exact in bf16, e4m3 (block 128, amax 0.75 -> scale 2^-9) and e2m1 (amax 6 * 2^-3)."""
    gen = torch.Generator().manual_seed(seed)
    out = _random_tensors(seed)
    for name, shape in _shapes().items():
        v = torch.tensor(E2M1)[torch.randint(0, len(E2M1), shape, generator=gen)]
        v.view(-1)[::32] = 6.0
        out[name] = (v / 8).bfloat16()
    return out


def _expected(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    return {n: (tuple(t.shape), torch.int64 if n.endswith("tid2eid") else None) for n, t in tensors.items()}


def _header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """{name: (dtype string, shape)} over every shard, read with safetensors directly."""
    out = {}
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                out[k] = (sl.get_dtype(), sl.get_shape())
    return out


def _check_close(name: str, got: torch.Tensor, src: torch.Tensor, fmt: str | None) -> None:
    x = src.float()
    err = (got - x).abs()
    amax = x.abs().max()
    if fmt is None:
        assert torch.equal(got, x), name
    elif fmt == "fp8":  # 3 mantissa bits; subnormal step <= 2 * amax / 448 * 2^-9
        assert (err <= x.abs() / 16 + amax / 1e5).all(), name
    else:  # e2m1: half a step, block scale <= 2 * amax / 6
        assert (err <= x.abs() / 4 + amax / 12).all(), name


@pytest.mark.parametrize("max_shard_bytes", [2**30, 6000])
@pytest.mark.parametrize("quant", ["none", "fp8", "fp8-fp4"])
def test_round_trip_random(tmp_path: Path, quant: str, max_shard_bytes: int) -> None:
    src = _random_tensors()
    save_checkpoint(tmp_path, CONFIG, src, quant=quant, max_shard_bytes=max_shard_bytes, progress=False)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    n = len(shards)
    assert (n == 1) == (max_shard_bytes == 2**30)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(
        (tmp_path / s).stat().st_size for s in shards) - sum(_header_bytes(tmp_path / s) for s in shards)
    reader = CheckpointReader(tmp_path)
    assert sorted(reader.names()) == sorted(src)
    loaded = reader.load(_expected(src), progress=False)
    assert list(loaded) == list(src)
    assert loaded["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    for name, t in loaded.items():
        fmt = None if quant == "none" else "fp8" if name in FP8_NAMES else None
        if name in EXPERT_NAMES and quant != "none":
            fmt = "fp4" if quant == "fp8-fp4" else "fp8"
        assert t.shape == src[name].shape
        _check_close(name, t if t.is_floating_point() else t.to(torch.int32), src[name], fmt)
        with safe_open(reader.file_of(name), "pt") as fh:
            assert name in fh.keys()


def _header_bytes(file: Path) -> int:
    return 8 + int.from_bytes(file.read_bytes()[:8], "little")


@pytest.mark.parametrize("quant", ["none", "fp8", "fp8-fp4"])
def test_stored_formats_and_config(tmp_path: Path, quant: str) -> None:
    src = _random_tensors()
    save_checkpoint(tmp_path, CONFIG, src, quant=quant, progress=False)
    header = _header(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["hidden_size"] == 32
    for name, (dtype, shape) in header.items():
        if name.endswith(".scale"):
            continue
        out_dim, in_dim = list(src[name].shape) + [0] * (2 - src[name].dim())
        if quant != "none" and (name in FP8_NAMES or (quant == "fp8" and name in EXPERT_NAMES)):
            assert (dtype, shape) == ("F8_E4M3", [out_dim, in_dim]), name
            scale = header[name.removesuffix(".weight") + ".scale"]
            assert scale == ("F8_E8M0", [-(-out_dim // 128), -(-in_dim // 128)]), name
        elif quant == "fp8-fp4" and name in EXPERT_NAMES:
            assert (dtype, shape) == ("I8", [out_dim, in_dim // 2]), name
            assert header[name.removesuffix(".weight") + ".scale"] == ("F8_E8M0", [out_dim, in_dim // 32])
        else:
            assert (dtype, shape) == ({torch.bfloat16: "BF16", torch.float32: "F32", torch.int32: "I32"}[
                src[name].dtype], list(src[name].shape)), name
    if quant == "none":
        assert "quantization_config" not in cfg and cfg["expert_dtype"] is None
    else:
        assert cfg["quantization_config"] == {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "scale_fmt": "ue8m0", "weight_block_size": [128, 128],
        }
        assert cfg["expert_dtype"] == ("fp4" if quant == "fp8-fp4" else None)
    assert CheckpointReader(tmp_path).config == cfg


@pytest.mark.parametrize("quant", ["none", "fp8", "fp8-fp4"])
def test_round_trip_exact_for_representable(tmp_path: Path, quant: str) -> None:
    src = _representable_tensors(1)
    save_checkpoint(tmp_path, CONFIG, src, quant=quant, max_shard_bytes=4000, progress=False)
    loaded = CheckpointReader(tmp_path).load(_expected(src), dtype=torch.bfloat16, progress=False)
    for name, t in loaded.items():
        want_dtype = torch.int64 if name.endswith("tid2eid") else torch.bfloat16
        assert t.dtype == want_dtype and torch.equal(t, src[name].to(want_dtype)), name


class _Spy:
    """Wraps safetensors.safe_open; records opened files and every tensor touched."""

    def __init__(self) -> None:
        self.files: list[str] = []
        self.touched: list[str] = []

    def __call__(self, path: str, framework: str) -> Any:
        self.files.append(Path(path).name)
        spy, inner = self, safe_open(path, framework)

        class Handle:
            def __enter__(self) -> Handle:
                inner.__enter__()
                return self

            def __exit__(self, *exc: object) -> None:
                inner.__exit__(*exc)

            def keys(self) -> list[str]:
                return list(inner.keys())

            def get_slice(self, name: str) -> Any:
                spy.touched.append(name)
                return inner.get_slice(name)

            def get_tensor(self, name: str) -> torch.Tensor:
                spy.touched.append(name)
                return inner.get_tensor(name)

        return Handle()


def test_skip_never_reads_skipped_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _random_tensors()
    src = {n: src[n] for n in sorted(src, key=lambda n: (n in EXPERT_NAMES, n))}  # experts last
    save_checkpoint(tmp_path, CONFIG, src, quant="fp8-fp4", max_shard_bytes=3000, progress=False)
    reader = CheckpointReader(tmp_path)
    spy = _Spy()
    monkeypatch.setattr(ckpt, "safe_open", spy)

    def skip(name: str) -> bool:
        return ".experts." in name and ".experts.1." not in name

    loaded = reader.load(_expected(src), skip=skip, progress=False)
    kept = {n for n in src if not skip(n)}
    assert set(loaded) == kept and "layers.0.ffn.experts.1.w2.weight" in loaded
    skipped = [n for n in src if skip(n)]
    touched = {t.removesuffix(".scale") + ".weight" if t.endswith(".scale") else t for t in spy.touched}
    assert touched == kept
    skipped_only = {reader.file_of(n) for n in skipped} - {reader.file_of(n) for n in kept}
    assert skipped_only, "the layout should put some skipped experts in shards of their own"
    assert not {Path(f).name for f in skipped_only} & set(spy.files)
    name = "layers.0.ffn.experts.1.w2.weight"
    _check_close(name, loaded[name], src[name], "fp4")


def test_strict_rejects_unexpected_tensors(tmp_path: Path) -> None:
    src = _random_tensors()
    save_checkpoint(tmp_path, CONFIG, src, progress=False)
    expected = _expected(src)
    del expected["head.weight"]
    reader = CheckpointReader(tmp_path)
    assert "head.weight" not in reader.load(expected, progress=False)
    _raises(lambda: reader.load(expected, strict=True, progress=False),
            "head.weight", "model-00001-of-00001.safetensors")
    reader.load(expected, strict=True, skip=lambda n: n == "head.weight", progress=False)


def _saved(tmp_path: Path, quant: str = "fp8-fp4", max_shard_bytes: int = 3000) -> dict[str, torch.Tensor]:
    src = _random_tensors()
    save_checkpoint(tmp_path, CONFIG, src, quant=quant, max_shard_bytes=max_shard_bytes, progress=False)
    return src


def _raises(fn: Any, *fragments: str) -> None:
    with pytest.raises(CheckpointError) as info:
        fn()
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_error_missing_tensor(tmp_path: Path) -> None:
    src = _saved(tmp_path)
    expected = _expected(src) | {"layers.9.attn.wq_a.weight": ((4, 4), None)}
    _raises(lambda: CheckpointReader(tmp_path).load(expected, progress=False),
            "layers.9.attn.wq_a.weight", "model.safetensors.index.json")


def test_error_wrong_shape(tmp_path: Path) -> None:
    src = _saved(tmp_path)
    reader = CheckpointReader(tmp_path)
    for name in ("layers.0.attn.wkv.weight", "layers.0.ffn.experts.2.w1.weight", "norm.weight"):
        expected = _expected(src) | {name: ((7, 8), None)}
        _raises(lambda e=expected: reader.load(e, progress=False), name, Path(reader.file_of(name)).name)


def test_error_wrong_dtype(tmp_path: Path) -> None:
    src = _saved(tmp_path)
    reader = CheckpointReader(tmp_path)
    for name, dtype in (("layers.0.ffn.gate.tid2eid", torch.float32), ("embed.weight", torch.int32)):
        expected = _expected(src) | {name: (tuple(src[name].shape), dtype)}
        _raises(lambda e=expected: reader.load(e, progress=False), name, Path(reader.file_of(name)).name)


def test_error_corrupt_shard(tmp_path: Path) -> None:
    src = _saved(tmp_path)
    reader = CheckpointReader(tmp_path)
    file = Path(reader.file_of("layers.0.attn.wkv.weight"))
    file.write_bytes(file.read_bytes()[:-100])
    _raises(lambda: reader.load(_expected(src), progress=False), file.name, "layers.0.attn.wkv")


def test_error_index_names_missing_shard(tmp_path: Path) -> None:
    _saved(tmp_path)
    file = Path(CheckpointReader(tmp_path).file_of("mtp.0.e_proj.weight"))
    file.unlink()
    _raises(lambda: CheckpointReader(tmp_path), file.name, "mtp.0.e_proj")


def test_error_missing_config_and_missing_weights(tmp_path: Path) -> None:
    _saved(tmp_path)
    (tmp_path / "config.json").unlink()
    _raises(lambda: CheckpointReader(tmp_path), "config.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    _raises(lambda: CheckpointReader(empty), "model.safetensors")


def _write_single(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text("{}")
    save_file(tensors, str(path / "model.safetensors"))


def test_single_file_hand_built_formats(tmp_path: Path) -> None:
    fp8 = torch.full((130, 40), 1.5).to(torch.float8_e4m3fn)
    packed = torch.full((2, 16), 0x21, dtype=torch.uint8)  # even 0.5, odd 1.0
    _write_single(tmp_path, {
        "a.weight": fp8, "a.weight_scale_inv": torch.tensor([[2.0], [0.25]]),  # Flash-Base style fp32
        "b.weight": packed.view(torch.float4_e2m1fn_x2),
        "b.scale": torch.tensor([[128], [126]], dtype=torch.uint8).view(torch.float8_e8m0fnu),
        "c.tid2eid": torch.tensor([[0, 2]], dtype=torch.int64),
    })
    reader = CheckpointReader(tmp_path)
    assert sorted(reader.names()) == ["a.weight", "b.weight", "c.tid2eid"]
    got = reader.load({"a.weight": ((130, 40), None), "b.weight": ((2, 32), None),
                       "c.tid2eid": ((1, 2), torch.int32)}, progress=False)
    assert (got["a.weight"][:128] == 3.0).all() and (got["a.weight"][128:] == 0.375).all()
    assert got["b.weight"][0].tolist() == [1.0, 2.0] * 16 and got["b.weight"][1].tolist() == [0.25, 0.5] * 16
    assert got["c.tid2eid"].dtype == torch.int32 and got["c.tid2eid"].tolist() == [[0, 2]]


def test_error_bad_scale_shape_and_missing_scale(tmp_path: Path) -> None:
    _write_single(tmp_path, {
        "a.weight": torch.ones(130, 40).to(torch.float8_e4m3fn), "a.scale": torch.ones(1, 1),
        "b.weight": torch.ones(4, 8).to(torch.float8_e4m3fn),
    })
    reader = CheckpointReader(tmp_path)
    load = reader.load
    _raises(lambda: load({"a.weight": ((130, 40), None)}, progress=False), "a.scale", "model.safetensors")
    _raises(lambda: load({"b.weight": ((4, 8), None)}, progress=False), "b.weight", "model.safetensors")


def test_error_corrupt_single_file(tmp_path: Path) -> None:
    _write_single(tmp_path, {"a.weight": torch.ones(4, 4)})
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    _raises(lambda: CheckpointReader(tmp_path), "model.safetensors")


def test_save_rejects_bad_requests(tmp_path: Path) -> None:
    bad_fp4 = {"layers.0.ffn.experts.0.w1.weight": torch.ones(4, 48)}
    _raises(lambda: save_checkpoint(tmp_path, {}, bad_fp4, quant="fp8-fp4", progress=False),
            "layers.0.ffn.experts.0.w1.weight")
    save_checkpoint(tmp_path, {}, bad_fp4, quant="fp8", progress=False)  # FP8 takes any 2-D shape
    with pytest.raises(ValueError, match=re.escape("fp16")):
        save_checkpoint(tmp_path, {}, bad_fp4, quant="fp16", progress=False)


def test_loaded_tensors_do_not_alias_the_file(tmp_path: Path) -> None:
    src = {"a.weight": torch.ones(64, dtype=torch.float32), "b.tid2eid": torch.ones(8, dtype=torch.int32)}
    save_checkpoint(tmp_path, {}, src, progress=False)
    got = CheckpointReader(tmp_path).load(
        {"a.weight": ((64,), torch.float32), "b.tid2eid": ((8,), torch.int32)}, progress=False
    )
    file = tmp_path / "model-00001-of-00001.safetensors"
    raw = file.read_bytes()
    file.write_bytes(raw[:-288] + bytes(288))  # zero both tensors' bytes in place
    assert got["a.weight"].tolist() == [1.0] * 64 and got["b.tid2eid"].tolist() == [1] * 8
