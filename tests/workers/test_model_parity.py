"""The model against HF transformers' DeepseekV4ForCausalLM (the oracle), in float32.

HF's implementation leaves out the official FP8/FP4 rounding (and the Hadamard rotation,
exact without rounding), so parity runs with `simulate_quant` off; the modes are then
compared with it on. Known differences between HF and the spec (the official code),
where this project follows the spec:
- HF casts mHC's `post`/`comb` to the stream dtype before mixing; the official code
  mixes in fp32 and casts once. Identical in float32, so invisible here.
- HF has no MTP block (it drops `mtp.*`); ours loads and scores it (tested below
  against its own incremental form only).
"""

from __future__ import annotations

import pytest
import torch

from workers.model import Batch
from workers.score import score
from workers.weights import load_model, model_tensors

transformers = pytest.importorskip("transformers")

LENGTHS = (300, 173)  # cross the 128-token window and two 128-token compressed blocks


@pytest.fixture(scope="module")
def prompts() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(0, 129280, (n,), generator=gen) for n in LENGTHS]


@pytest.fixture(scope="module")
def hf_logits(tiny_checkpoint, prompts) -> list[torch.Tensor]:
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        return [hf(p[None], use_cache=False).logits[0].float() for p in prompts]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, dtype=torch.float32, simulate_quant=False, progress=False)


def assert_parity(ours: torch.Tensor, ref: torch.Tensor) -> None:
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel <= 1e-4, f"relative error {rel:.2e}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("step", [None, 1, 7, 64, 130], ids=["full", "incremental", "chunk7", "chunk64", "chunk130"])
def test_logits_match_hf(model, prompts, hf_logits, step):
    ours = score(model, prompts, step)
    for o, r in zip(ours, hf_logits, strict=True):
        assert_parity(o, r)


def test_logits_vary_across_positions(hf_logits):
    # A model whose logits do not depend on the context would make the parity vacuous.
    logits = hf_logits[0]
    assert (logits[1:] - logits[:-1]).abs().mean() > 0.1
    assert logits.argmax(-1).unique().numel() > 10


def test_modes_agree_with_simulated_quant(tiny_checkpoint, prompts):
    """With the FP8/FP4 rounding on, the modes agree up to rounding flips.

    Chunking changes the number of masked keys in each softmax, which changes fp32
    summation order by an ulp; the FP8 rounding of the next layer's KV turns a rare ulp
    into a whole e4m3 step (measured: relative error up to ~1e-3 for some splits, and 0
    for others). With the rounding off the same splits agree to 1e-6 (see above).
    """
    model = load_model(tiny_checkpoint, dtype=torch.float32, simulate_quant=True, progress=False)
    full = score(model, prompts, None)
    for step in (1, 5, 128):
        for a, b in zip(score(model, prompts, step), full, strict=True):
            assert ((a - b).norm() / b.norm()).item() < 5e-3
            assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.97


def test_simulated_quant_changes_logits(tiny_checkpoint, prompts, hf_logits):
    # The FP8/FP4 rounding is real: switching it on moves the logits a little, not a lot.
    model = load_model(tiny_checkpoint, dtype=torch.float32, simulate_quant=True, progress=False)
    sim = score(model, prompts[:1], None)[0]
    rel = ((sim - hf_logits[0]).norm() / hf_logits[0].norm()).item()
    assert 1e-5 < rel < 0.2


def test_bfloat16_close_to_float32(tiny_checkpoint, prompts, hf_logits):
    model = load_model(tiny_checkpoint, dtype=torch.bfloat16, simulate_quant=False, progress=False)
    ours = score(model, prompts[:1], 64)[0]
    rel = ((ours - hf_logits[0]).norm() / hf_logits[0].norm()).item()
    assert rel < 0.1
    assert (ours.argmax(-1) == hf_logits[0].argmax(-1)).float().mean() > 0.8


def test_mtp_scores_and_is_incremental(model, prompts):
    ids = prompts[0][:140]
    st = model.new_state()
    batch = Batch.build([ids[:-1]], [st])
    streams = model(batch, [st])
    mst = model.new_mtp_state()
    full = model.mtp_logits(streams, ids[1:], batch, [mst])
    assert full.shape == (139, model.cfg.vocab_size) and torch.isfinite(full).all()
    main = model.logits(streams)
    assert not torch.allclose(full, main, atol=1e-2)
    # the MTP block's own cache: feeding it in two chunks gives the same scores
    mst2 = model.new_mtp_state()
    b1 = Batch(ids[1:71], torch.arange(0, 70), [batch.seqs[0].__class__(0, 70, 0)])
    b2 = Batch(ids[71:140], torch.arange(70, 139), [batch.seqs[0].__class__(0, 69, 70)])
    part = torch.cat([
        model.mtp_logits(streams[:70], ids[1:71], b1, [mst2]),
        model.mtp_logits(streams[70:], ids[71:140], b2, [mst2]),
    ])
    assert ((part - full).norm() / full.norm()).item() < 1e-5


def test_expert_subsets_partition_the_routed_sum(tiny_checkpoint, monkeypatch):
    """Two models holding disjoint halves of the experts read only their own expert
    tensors, and their routed outputs add up to the full model's."""
    from safetensors import safe_open

    read: list[str] = []
    real = safe_open

    class Spy:
        def __init__(self, *a, **k):
            self._h = real(*a, **k)

        def __enter__(self):
            self._h.__enter__()
            return self

        def __exit__(self, *exc):
            return self._h.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self._h.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self._h, name)

    monkeypatch.setattr("workers.checkpoint.safe_open", Spy)
    full = load_model(tiny_checkpoint, dtype=torch.float32, simulate_quant=False, progress=False)
    read.clear()
    halves = [load_model(tiny_checkpoint, dtype=torch.float32, simulate_quant=False, progress=False,
                         expert_ids=ids) for ids in ([0, 1, 2, 3], [4, 5, 6, 7])]  # fmt: skip
    routed_reads = [n for n in read if ".ffn.experts." in n]
    expected = {n for n in model_tensors(full) if ".ffn.experts." in n}
    assert len(routed_reads) == len(set(routed_reads))  # no expert tensor read twice...
    assert {n for n in routed_reads if n.endswith(".weight")} == expected  # ...and each read by its owner
    x, ids = torch.randn(7, full.cfg.hidden_size), torch.randint(0, 129280, (7,))
    for layer in (0, 2):
        moes = [m.layers[layer].ffn for m in (full, *halves)]
        shared = moes[0].shared_experts(x)
        routed = [moe(x, ids) - shared for moe in moes]
        torch.testing.assert_close(routed[1] + routed[2], routed[0], atol=1e-5, rtol=1e-5)
