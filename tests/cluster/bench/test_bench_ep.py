"""`dsv4 bench ep` end to end on the tiny preset: a table row per W, and the bytes per step
the arithmetic of the wire format predicts."""

from __future__ import annotations

import json

import pytest

from cluster.cli.main import build_parser, main
from workers.presets import preset_config


def test_bench_ep_prints_a_row_per_worker_count(tiny_cache, tmp_path, capsys):
    batch, steps = 4, 2
    out = tmp_path / "ep.json"
    rc = main(["bench", "ep", "--presets", "tiny", "--workers", "1,2,4", "--batch", str(batch), "--prompt-len", "3",
               "--steps", str(steps), "--warmup", "1", "--dtype", "float32", "--json", str(out)])  # fmt: skip
    assert rc == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny |")]
    assert [line.split("|")[2].strip() for line in table] == ["1", "2", "4"]
    rows = {r["workers"]: r for r in json.loads(out.read_text())["rows"]}
    cfg = preset_config("tiny")
    # per decode step: batch tokens x K experts x MoE layers rows, each a dispatch row
    # (8 bytes of metadata + d fp32) out and an fp32 expert output row back
    rows_per_step = batch * cfg.num_experts_per_tok * cfg.num_hidden_layers
    want = rows_per_step * ((8 + 4 * cfg.hidden_size) + 4 * cfg.hidden_size)
    assert rows[1]["bytes_per_step"] == 0 and rows[1]["a2a_share"] == 0
    for w in (2, 4):
        r = rows[w]
        assert r["bytes_per_step"] == want and 0 < r["remote_bytes_per_step"] < want
        assert 0 < r["a2a_share"] < 1 and r["dispatch_ms"] > 0 and r["combine_ms"] > 0
        assert r["moe_layers"] == cfg.num_hidden_layers and 0 < r["worker_balancedness"] <= 1
    for r in rows.values():
        assert r["step_ms"] > 0 and 1 / cfg.n_routed_experts <= r["expert_balancedness"] <= 1


def test_bench_ep_help_explains_the_columns(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "ep", "--help"])
    text = capsys.readouterr().out
    for word in ("--workers", "--threads", "a2a %", "expert bal", "worker bal", "KiB/step"):
        assert word in text


@pytest.mark.parametrize(
    "argv",
    [["--workers", "3"], ["--workers", "two"], ["--presets", "huge"], ["--batch", "0"]],
)
def test_bench_ep_bad_arguments_are_usage_errors(argv, capsys):
    assert main(["bench", "ep", "--presets", "tiny", *argv]) == 2  # before any model is loaded
    assert "dsv4 bench: error:" in capsys.readouterr().err
