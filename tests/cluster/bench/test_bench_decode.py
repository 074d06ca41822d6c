"""`dsv4 bench decode` end to end on the tiny preset (with HF's decode step beside it), and
its profile counter against steps whose aten calls and host syncs are known."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cluster.bench.decode import profile_step
from cluster.cli.main import build_parser, main
from workers.presets import preset_config


def test_profile_counts_top_level_ops_and_host_syncs():
    x = torch.arange(6.0)

    def step() -> None:
        y = x + 1  # aten::add
        y.sum().item()  # aten::sum, aten::item (-> _local_scalar_dense: a sync)
        torch.nonzero(y > 3)  # aten::gt, aten::nonzero (a sync)

    assert profile_step(step) == (5, 2)


def test_profile_does_not_count_grouped_mm_offsets_as_syncs():
    x, w = torch.randn(6, 16), torch.randn(2, 16, 16)
    offs = torch.tensor([2, 6], dtype=torch.int32)
    ops, syncs = profile_step(lambda: F.grouped_mm(x, w, offs=offs))
    assert syncs == 0 and ops >= 1


def test_bench_decode_rows_per_batch_with_hf_beside(tiny_cache, tmp_path, capsys):
    out = tmp_path / "decode.json"
    rc = main(["bench", "decode", "--presets", "tiny", "--batch", "1,2", "--prompt-len", "5", "--steps", "2",
               "--warmup", "1", "--dtype", "float32", "--threads", "1", "--json", str(out)])  # fmt: skip
    assert rc == 0
    printed = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("tiny ")]
    assert [line[1] for line in printed] == ["1", "2"]
    doc = json.loads(out.read_text())
    one, two = doc["rows"]
    cfg = preset_config("tiny")
    head_flops = 2 * cfg.vocab_size * cfg.hidden_size  # the head alone, per token
    assert one["gflops"] * 1e9 > head_flops and two["gflops"] == pytest.approx(2 * one["gflops"])
    assert two["mbytes"] * 1e6 > 4 * cfg.vocab_size * cfg.hidden_size  # at least the fp32 head is read
    for r in (one, two):
        assert r["step_ms"] > 0 and 0 < r["roofline_pct"] <= 100 and r["aten_ops"] > 100
        assert r["ops_per_layer"] == pytest.approx(r["aten_ops"] / cfg.num_hidden_layers)
        assert r["hf_ms"] > 0 and r["speedup"] == pytest.approx(r["hf_ms"] / r["step_ms"])
    assert doc["machine"]["bandwidth"] > 1e8 and doc["machine"]["flops"] > 1e8


def test_bench_decode_help_explains_the_columns(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "decode", "--help"])
    text = capsys.readouterr().out
    for word in ("roofline", "host syncs", "aten ops", "--batch", "--threads", "HF"):
        assert word in text


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--batch", "one"], ["--presets", "huge"], ["--steps", "0"]])
def test_bench_decode_bad_arguments_are_usage_errors(argv):
    assert main(["bench", "decode", "--presets", "tiny", *argv]) == 2  # before any model is loaded
