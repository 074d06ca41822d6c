"""The 2-minute soak CI runs: `dsv4 bench soak` against a `dsv4 serve` it starts, 16
clients of mixed and hostile calls; nothing may drift."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_a_two_minute_soak_keeps_canaries_pages_and_memory(tiny_cache, tmp_path):
    report = tmp_path / "soak.json"
    cmd = [sys.executable, "-m", "cluster.cli", "bench", "soak", "--minutes", "2", "--concurrency", "16",
           "--json", str(report)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads(report.read_text())
    assert r["canaries"] >= 50 and r["canary_mismatches"] == 0, r
    assert r["pages_used_end"] == 0 and r["pages_free_end"] == r["pages_free_start"], r
    assert not r["broken"] and set(r["by_kind"]) == {"generate", "chat", "cancel", "abort", "deadline", "malformed",
                                                      "canary"}, r  # fmt: skip
    assert r["codes"]["OK"] >= 200 and r["codes"]["INVALID_ARGUMENT"] >= 1, r["codes"]
    assert r["rss_end_mb"] - r["rss_first_tenth_mb"] < 200, r
    assert r["server_exit"] == 0


def test_bad_soak_arguments_and_an_unreachable_target_are_clear_errors():
    def soak(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "soak", *args], capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    done = soak("--minutes", "0")
    assert done.returncode == 2 and "--minutes must be > 0, got 0.0" in done.stderr, done.stderr
    done = soak("--concurrency", "0")
    assert done.returncode == 2 and "--concurrency must be >= 1" in done.stderr, done.stderr
    done = soak("--target", "127.0.0.1:1")
    assert done.returncode == 2 and "the gateway at 127.0.0.1:1 cannot answer the canaries: UNAVAILABLE" in done.stderr
