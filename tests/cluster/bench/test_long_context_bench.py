"""benchmarks/long_context_bench.py: a request through a prefill and a decode instance,
its report checked against the KV arithmetic; the script runs a length in its own
process and prints the table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from workers.config import ModelConfig
from workers.kv_cache import KVLayout
from workers.presets import preset_config

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "long_context_bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("long_context_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_follows_the_kv_arithmetic(tiny_checkpoint, capsys):
    bench = _bench()
    n, decode = 2048, 3
    r = bench.run_one(tiny_checkpoint, n, chunk=1024, decode=decode, progress=False)
    layout = KVLayout.for_model(ModelConfig.from_json(tiny_checkpoint), elem_bytes=4)
    assert r["finish_reason"] == "length" and r["completion_tokens"] == 1 + decode
    assert r["handoffs"] == 1 and r["decode_steps"] == decode
    # a 128-token boundary: the handed-off state is exactly the arithmetic's bytes
    assert r["handoff_bytes"] == r["kv_bytes"] == layout.bytes_for(n)
    assert r["pool_bytes"] >= 2 * layout.bytes_for(n)  # reserved on both instances
    assert 0 < r["prefill_s"] and 0 < r["decode_ms"] and r["peak_rss"] >= r["setup_rss"] > r["model_bytes"] > 0
    bench.print_table([r], "tiny")
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith(f"| {n} |") and row.count("|") == 12


def test_script_runs_a_length_in_its_own_process(tiny_checkpoint, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-seed0").symlink_to(tiny_checkpoint)  # what ensure_preset_checkpoint looks for
    env = {**os.environ, "DSV4_CACHE": str(tmp_path)}
    cmd = [sys.executable, str(SCRIPT), "--preset", "tiny", "--tokens", "256", "--chunk", "128", "--decode", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    reports = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert [r["tokens"] for r in reports] == [256]
    assert reports[0]["handoff_bytes"] == reports[0]["kv_bytes"] and reports[0]["completion_tokens"] == 2
    assert any(line.startswith("| 256 |") for line in done.stdout.splitlines())


def test_long_preset_is_cheap_where_the_context_costs():
    """One layer of each kind and one indexer head: prefill's quadratic part is the indexer's
    N^2/8 query-key pairs of a single CSA layer."""
    cfg = preset_config("long")
    kinds = [cfg.compress_ratio(i) for i in range(cfg.num_hidden_layers)]
    assert sorted(kinds) == [0, 4, 128] and cfg.index_n_heads == 1
    assert cfg.max_position_embeddings == 1048576 and cfg.sliding_window == 128 and cfg.vocab_size == 129280
