"""Quantized weights resident (issue #7): `load_model(..., resident_quant=True)` keeps the
FP8 linears and FP4 experts as the kernels read them and frees the dequantized copies.

Oracles: the same checkpoint loaded the default way (dequantized weights; its kernel path
re-quantizes lazily) for the logits of both paths, bit for bit; the safetensors files
themselves for the packed tensors' bytes and values (their dtypes and shapes give the
arithmetic: e4m3 1 byte per element + one ue8m0 byte per 128x128 block, e2m1 half a byte
+ one ue8m0 byte per 32).
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

import kernels
from kernels.quant import dequant_fp4_weight
from tests.kernels.helpers import requires_triton
from workers.layers import Linear
from workers.model import Batch
from workers.moe import ExpertGroup
from workers.weights import load_model, resident_weight_bytes

_DISPATCHERS = [n for n in kernels.__all__ if n not in ("HAS_TRITON", "use_triton")]


def _load(path, dtype: torch.dtype, resident: bool, **kw):
    return load_model(path, dtype=dtype, simulate_quant=True, progress=False, resident_quant=resident, **kw)


def _stored(path) -> dict[str, tuple[str, tuple[int, int], torch.Tensor, torch.Tensor]]:
    """Weight name -> (format, logical [out, in], stored weight, stored scale) for every tensor
    stored with a `.scale`, read from the files without the loader."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as fh:
            for key in fh.keys():
                if key.endswith(".scale"):
                    name = key.removesuffix(".scale") + ".weight"
                    w = fh.get_tensor(name)
                    fmt = "fp8" if w.dtype == torch.float8_e4m3fn else "fp4"
                    shape = (w.shape[0], w.shape[1] * (2 if fmt == "fp4" else 1))
                    out[name] = (fmt, shape, w, fh.get_tensor(key))
    return out


def _logits(model, kernel_path: bool) -> list[torch.Tensor]:
    """Prefill two sequences (150 tokens: every expert gets rows), then one decode step (a few experts)."""
    model.set_kernel_path(kernel_path)
    model.configure_kv()
    gen = torch.Generator().manual_seed(4)
    st = [model.new_state(), model.new_state()]
    out = [model.logits(model(Batch.build([torch.randint(0, 129280, (n,), generator=gen) for n in (150, 20)], st),
                              st))]  # fmt: skip
    out.append(model.logits(model(Batch.build([torch.tensor([5]), torch.tensor([9])], st), st)))
    model.set_kernel_path(None)
    return out


@pytest.fixture
def kernel_path_with_references(monkeypatch):
    """The GPU's path on CPU: `use_triton` says yes, every dispatcher runs its torch reference;
    counts the quantized GEMM calls and records the weights they got."""
    calls: dict[str, list[torch.Tensor]] = {"fp8_gemm": [], "fp4_grouped_gemm": []}
    monkeypatch.setattr(kernels, "use_triton", lambda *t: True)
    for name in _DISPATCHERS:
        ref = getattr(kernels, name + "_ref")

        def spy(*args, _name=name, _ref=ref, **kw):
            if _name in calls:
                calls[_name].append(args[1])
            return _ref(*args, **kw)

        monkeypatch.setattr(kernels, name, spy)
    return calls


def _assert_equal(got: list[torch.Tensor], expect: list[torch.Tensor]) -> None:
    assert len(got) == len(expect) == 2
    for g, e in zip(got, expect, strict=True):
        assert torch.isfinite(g).all() and torch.equal(g, e)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_path_logits_are_bit_identical(quantized_checkpoint, kernel_path_with_references, dtype):
    """Prefill and a decode step through `fp8_gemm` / `fp4_grouped_gemm`: a resident model
    feeds the kernels its buffers and copies nothing; the default model re-quantizes lazily
    (and then holds both), with the same logits."""
    plain, resident = _load(quantized_checkpoint, dtype, False), _load(quantized_checkpoint, dtype, True)
    plain_bytes, resident_bytes = resident_weight_bytes(plain), resident_weight_bytes(resident)
    expect = _logits(plain, True)
    assert resident_weight_bytes(plain) > plain_bytes  # the lazily re-quantized copies
    calls = kernel_path_with_references
    for seen in calls.values():
        seen.clear()
    got = _logits(resident, True)
    _assert_equal(got, expect)
    buffers = {t.data_ptr() for t in resident.buffers()}
    assert len(calls["fp8_gemm"]) > 10 and len(calls["fp4_grouped_gemm"]) > 10
    assert all(w.data_ptr() in buffers for w in calls["fp8_gemm"] + calls["fp4_grouped_gemm"])
    assert resident_weight_bytes(resident) == resident_bytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_torch_path_dequantizes_per_call_to_the_same_logits(quantized_checkpoint, dtype):
    plain, resident = _load(quantized_checkpoint, dtype, False), _load(quantized_checkpoint, dtype, True)
    _assert_equal(_logits(resident, False), _logits(plain, False))


@requires_triton
def test_triton_kernels_get_the_same_weights(quantized_checkpoint, monkeypatch):
    """The Triton kernels themselves (interpreted) on one FP8 linear and one FP4 expert group."""
    monkeypatch.setenv("DSV4_KERNELS", "triton")
    plain = _load(quantized_checkpoint, torch.bfloat16, False)
    resident = _load(quantized_checkpoint, torch.bfloat16, True)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 128, generator=gen).bfloat16()
    ids, weights = torch.tensor([3, 0, 3, 7, 1]), torch.rand(5, generator=gen) + 0.1
    out = [(m.layers[1].attn.wq_a(x), m.layers[1].ffn.experts(x, ids, weights)) for m in (plain, resident)]
    for expect, got in zip(*out, strict=True):
        assert torch.equal(got, expect)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_resident_bytes_are_the_checkpoints_quantized_bytes(quantized_checkpoint, dtype):
    """Every tensor stored with a scale is held at its stored size, except `attn.wo_a` (read as
    a plain weight by attention, so kept dequantized); everything else is as before."""
    plain, resident = _load(quantized_checkpoint, dtype, False), _load(quantized_checkpoint, dtype, True)
    packed = {n: v for n, v in _stored(quantized_checkpoint).items() if ".attn.wo_a." not in n}
    assert {v[0] for v in packed.values()} == {"fp8", "fp4"}

    def stored_bytes(fmt: str, shape: tuple[int, int]) -> int:
        out_dim, in_dim = shape
        if fmt == "fp8":
            return out_dim * in_dim + math.ceil(out_dim / 128) * math.ceil(in_dim / 128)
        return out_dim * in_dim // 2 + out_dim * in_dim // 32

    quantized = sum(stored_bytes(fmt, shape) for fmt, shape, _, _ in packed.values())
    dequantized = sum(shape[0] * shape[1] * dtype.itemsize for _, shape, _, _ in packed.values())
    plain_bytes = sum(t.numel() * t.element_size() for t in plain.state_dict().values())
    assert resident_weight_bytes(plain) == plain_bytes
    assert resident_weight_bytes(resident) == plain_bytes - dequantized + quantized
    assert quantized < dequantized * (0.55 if dtype == torch.float32 else 0.8)
    for module in resident.modules():
        if isinstance(module, (Linear, ExpertGroup)) and module.is_packed:
            assert not any(p.is_floating_point() and p.dtype.itemsize > 1 for p in module.parameters())
    assert not resident.layers[1].attn.wo_a.is_packed and resident.layers[1].attn.wq_a.is_packed


def test_expert_parallel_subset_packs_only_its_experts(quantized_checkpoint):
    """A worker holding experts {1, 4, 6} packs exactly those (values from the files), at
    3/8 of the full model's expert bytes; `.to()` moves the packed buffers."""
    held = [6, 1, 4]
    sub = _load(quantized_checkpoint, torch.bfloat16, True, expert_ids=held)
    full = _load(quantized_checkpoint, torch.bfloat16, True)
    stored = _stored(quantized_checkpoint)
    for layer in (0, 2):
        group = sub.layers[layer].ffn.experts
        assert group.is_packed and group.expert_ids == [1, 4, 6]
        for name in ("w1", "w2", "w3"):
            packed, scale = getattr(group, f"{name}_fp4"), getattr(group, f"{name}_scale")
            assert packed.dtype == torch.uint8 and packed.shape[0] == scale.shape[0] == 3
            for k, e in enumerate(group.expert_ids):
                _, _, w, s = stored[f"layers.{layer}.ffn.experts.{e}.{name}.weight"]
                assert torch.equal(dequant_fp4_weight(packed[k], scale[k]), dequant_fp4_weight(w, s))
    experts = sum(b.nbytes for n, b in full.named_buffers() if ".experts." in n)
    assert sum(b.nbytes for n, b in sub.named_buffers() if ".experts." in n) * 8 == experts * 3
    assert resident_weight_bytes(full) - resident_weight_bytes(sub) == experts * 5 // 8
    sub.to(torch.device("meta"))
    assert all(b.is_meta for n, b in sub.named_buffers() if n.endswith(("_fp4", "_fp8", "_scale")))
