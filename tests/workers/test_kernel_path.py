"""The model's kernel path: attention through `kernels/` (sparse attention over row ids
into the pool's `kv_rows`, the fused indexer top-k, compressor pooling, RMSNorm + RoPE,
Sinkhorn), which a GPU takes. Oracle: the pure-torch path the CPU takes, on the same
sequences -- prefill chunks that cross 4- and 128-token blocks, then batched decode.
"""

from __future__ import annotations

import pytest
import torch

from workers.model import Batch
from workers.weights import load_model


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    m = load_model(tiny_checkpoint, dtype=torch.float32, simulate_quant=True, progress=False)
    yield m
    m.set_kernel_path(None)


def _run(model, kernel_path: bool, lengths: tuple[int, ...], split: int, decode_steps: int) -> list[torch.Tensor]:
    """Prefill sequences of `lengths` (the first in two chunks cut at `split`), then decode."""
    model.set_kernel_path(kernel_path)
    model.configure_kv()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 129280, (n,), generator=gen) for n in lengths]
    states = [model.new_state() for _ in prompts]
    out = [model.logits(model(Batch.build([prompts[0][:split], *prompts[1:]], states), states))]
    out.append(model.logits(model(Batch.build([prompts[0][split:]], states[:1]), states[:1])))
    for _ in range(decode_steps):
        ids = [torch.randint(0, 129280, (1,), generator=gen) for _st in states]
        out.append(model.logits(model(Batch.build(ids, states), states)))
    for st in states:
        st.free()
    return out


def _assert_close(got: list[torch.Tensor], expect: list[torch.Tensor]) -> None:
    assert len(got) == len(expect)
    for g, e in zip(got, expect, strict=True):
        assert g.shape == e.shape and torch.isfinite(g).all()
        torch.testing.assert_close(g, e, atol=2e-4, rtol=1e-4)


def test_kernel_path_with_references_matches_the_torch_path(model, monkeypatch):
    """The glue alone (row ids, blocks, gathered picks), with each kernel's torch reference:
    300 tokens give 75 CSA keys (the indexer drops most) and 2 HCA entries; decode steps
    cross a 4-token block boundary."""
    monkeypatch.setenv("DSV4_KERNELS", "ref")
    expect = _run(model, False, (300, 131), 200, 5)
    _assert_close(_run(model, True, (300, 131), 200, 5), expect)


def test_triton_kernels_in_the_model_under_the_interpreter(model, monkeypatch):
    """The Triton kernels themselves, launched by the model (interpreted on CPU); short
    sequences, as the interpreter is slow: 72 tokens give 18 CSA keys, so the indexer's
    top-16 (prefill and the paged decode kernel) drops some."""
    monkeypatch.setenv("DSV4_KERNELS", "ref")
    expect = _run(model, False, (72, 9), 60, 2)
    monkeypatch.setenv("DSV4_KERNELS", "triton")
    _assert_close(_run(model, None, (72, 9), 60, 2), expect)
