"""`dsv4 init-model` and `dsv4 logits`, run as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from workers.weights import load_model, model_tensors


def dsv4(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cluster.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see tests/conftest.py
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def quantized_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "tiny-fp8-fp4"
    dsv4("init-model", "--preset", "tiny", "--seed", "0", "--quant", "fp8-fp4", "--out", str(out))
    return out


def test_init_model_writes_official_layout(quantized_checkpoint):
    config = json.loads((quantized_checkpoint / "config.json").read_text())
    assert config["expert_dtype"] == "fp4" and config["quantization_config"]["fmt"] == "e4m3"
    index = json.loads((quantized_checkpoint / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert "layers.1.ffn.experts.3.w1.weight" in names and "layers.1.ffn.experts.3.w1.scale" in names
    assert "layers.0.ffn.gate.tid2eid" in names and "layers.1.ffn.gate.bias" in names
    assert "mtp.0.e_proj.weight" in names and "layers.1.attn.indexer.compressor.ape" in names
    assert not any(n.startswith("model.") for n in names)


def test_quantized_round_trip_matches_bf16_source(quantized_checkpoint, tiny_checkpoint):
    # Same preset and seed: the quantized checkpoint holds the bf16 source up to rounding.
    q = model_tensors(load_model(quantized_checkpoint, dtype=torch.float32, progress=False))
    ref = model_tensors(load_model(tiny_checkpoint, dtype=torch.float32, progress=False))
    assert q.keys() == ref.keys()
    for name, value in ref.items():
        err = ((q[name].float() - value.float()).norm() / value.float().norm().clamp_min(1e-12)).item()
        if ".experts." in name and "shared" not in name:
            assert 0 < err < 0.15, name  # FP4 e2m1, one power-of-two scale per 32
        elif any(k in name for k in ("wq_a", "wq_b", "wkv.", "wo_a", "wo_b", "shared_experts", "_proj")) and (
            "compressor" not in name and "weights_proj" not in name
        ):
            assert 0 < err < 0.04, name  # FP8 e4m3, 128x128 blocks
        else:
            assert err == 0, name  # kept as written


def test_logits_modes_agree(tiny_checkpoint, tmp_path):
    ids = {"input_ids": [list(range(1000, 1150)), [5, 6, 7]]}
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    outs = {}
    for mode, extra in (("full", []), ("chunked", ["--chunk", "13"]), ("incremental", [])):
        out = tmp_path / f"{mode}.safetensors"
        dsv4("logits", "--checkpoint", str(tiny_checkpoint), "--input", str(tmp_path / "ids.json"),
             "--output", str(out), "--mode", mode, "--no-simulate-quant", *extra)  # fmt: skip
        outs[mode] = load_file(out)
    full = outs["full"]
    assert full["logits.0"].shape == (150, 129280) and full["logits.1"].shape == (3, 129280)
    for mode in ("chunked", "incremental"):
        for key in full:
            torch.testing.assert_close(outs[mode][key], full[key], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"input_ids": [[1, 2, 129280]]}, r"input_ids\[0\]\[2\] = 129280"),
        ({"input_ids": [[1], []]}, r"input_ids\[1\] must be a non-empty list"),
        ({"input_ids": []}, "at least one sequence"),
        ({"ids": [[1]]}, "input_ids"),
    ],
)
def test_logits_rejects_bad_input(tiny_checkpoint, tmp_path, payload, message):
    (tmp_path / "ids.json").write_text(json.dumps(payload))
    proc = dsv4("logits", "--checkpoint", str(tiny_checkpoint), "--input", str(tmp_path / "ids.json"),
                "--output", str(tmp_path / "o.safetensors"), check=False)  # fmt: skip
    assert proc.returncode == 2
    assert re.search(message, proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr


def test_logits_rejects_unreadable_checkpoint(tmp_path):
    (tmp_path / "ids.json").write_text('{"input_ids": [[1]]}')
    proc = dsv4("logits", "--checkpoint", str(tmp_path / "nope"), "--input", str(tmp_path / "ids.json"),
                "--output", str(tmp_path / "o.safetensors"), check=False)  # fmt: skip
    assert proc.returncode == 2 and "config.json" in proc.stderr and "Traceback" not in proc.stderr


def test_corrupt_tid2eid_is_refused(tmp_path):
    from workers.checkpoint import CheckpointError, save_checkpoint
    from workers.presets import preset_config
    from workers.weights import random_weights

    cfg = preset_config("tiny")
    tensors = random_weights(cfg, seed=1)
    tensors["layers.0.ffn.gate.tid2eid"][7, 0] = cfg.n_routed_experts  # out of range
    save_checkpoint(tmp_path, cfg.to_dict(), tensors, progress=False)
    with pytest.raises(CheckpointError, match="tid2eid"):
        load_model(tmp_path, progress=False)
