"""`dsv4 bench serve`: the engine's throughput and latency at several concurrencies, next
to HF transformers' `generate` on the same checkpoint and prompts, in the same run."""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from cluster.engine.requests import GenerateRequest, RequestOutput
from workers.presets import PRESETS
from workers.step import SamplingParams


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run_engine(engine, prompts: list[list[int]], max_tokens: int) -> dict:
    """Submit all prompts at once; measure output tok/s, TTFT and inter-token latency."""
    stamps: dict[str, list[float]] = {}
    done = threading.Event()
    remaining = [len(prompts)]
    lock = threading.Lock()

    def sink_for(uid: str):
        def sink(out: RequestOutput) -> None:
            with lock:
                if out.token_ids:
                    stamps[uid].append(time.perf_counter())
                if out.finished:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()
        return sink

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        stamps[f"b{i}"] = []
        engine.submit(GenerateRequest(f"b{i}", tuple(p), params), sink_for(f"b{i}"))
    done.wait()
    wall = time.perf_counter() - t0
    engine.wait_idle()
    ttft = [(s[0] - t0) * 1000 for s in stamps.values() if s]
    itl = [(b - a) * 1000 for s in stamps.values() for a, b in zip(s, s[1:], strict=False)]
    n_out = sum(len(s) for s in stamps.values())
    return {
        "tok_s": n_out / wall,
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
        "itl_p50_ms": percentile(itl, 50), "itl_p90_ms": percentile(itl, 90), "itl_p99_ms": percentile(itl, 99),
    }  # fmt: skip


def run_hf(hf, prompts: list[list[int]], max_tokens: int) -> float:
    """HF generate on the same prompts as one static batch (equal lengths: no padding); output tok/s."""
    import torch

    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.inference_mode():
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                    min_new_tokens=max_tokens, do_sample=False)  # fmt: skip
    return len(prompts) * max_tokens / (time.perf_counter() - t0)


def run_hf_sequential(hf, prompts: list[list[int]], max_tokens: int) -> float:
    """HF generate one request at a time (a server without batching); output tok/s over up to 4 prompts."""
    sample = prompts[:4]
    t0 = time.perf_counter()
    for p in sample:
        run_hf(hf, [p], max_tokens)
    return len(sample) * max_tokens / (time.perf_counter() - t0)


def bench_serve_main(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from cluster.assembly.build import build_instance, compute_dtype, serving_threads
    from cluster.assembly.manifest import parse_manifest
    from cluster.assembly.model_cache import ensure_preset_checkpoint

    torch.set_num_threads(serving_threads(args.threads))  # as dsv4 serve picks them
    presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; known: {', '.join(PRESETS)}")
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    rows = []
    for preset in presets:
        ckpt = ensure_preset_checkpoint(preset)
        dtype = compute_dtype(args.dtype, device="cpu")
        scheduler = {"max_running": max(concurrencies), "prefix_cache": False}
        manifest = parse_manifest({"model": {"dtype": str(dtype).removeprefix("torch.")}, "scheduler": scheduler})
        engine = build_instance(manifest, checkpoint=ckpt)
        hf = None
        if not args.no_hf:
            import transformers

            hf = transformers.DeepseekV4ForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
        gen = torch.Generator().manual_seed(0)
        run_engine(engine, [torch.randint(3, 120000, (args.prompt_len,), generator=gen).tolist()], 4)  # warm-up
        for c in tqdm(concurrencies, desc=f"bench serve {preset}", unit="conc"):
            prompts = torch.randint(3, 120000, (c, args.prompt_len), generator=gen).tolist()
            row = {"preset": preset, "concurrency": c, **run_engine(engine, prompts, args.max_tokens)}
            if hf is not None:
                row["hf_tok_s"] = run_hf(hf, prompts, args.max_tokens)
                row["speedup"] = row["tok_s"] / row["hf_tok_s"]
                row["hf_seq_tok_s"] = run_hf_sequential(hf, prompts, args.max_tokens)
                row["speedup_seq"] = row["tok_s"] / row["hf_seq_tok_s"]
            rows.append(row)
        engine.stop()
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args) | {"func": None}, "rows": rows}, indent=2))


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    import torch

    print(f"\ndsv4 bench serve: torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"prompt {args.prompt_len} tokens, {args.max_tokens} output tokens, greedy")  # fmt: skip
    print("HF batch: generate on the same prompts as one static batch; HF seq: one request at a time")
    print(f"{'preset':8} {'conc':>4} {'tok/s':>8} {'HF batch':>9} {'x':>6} {'HF seq':>8} {'x':>6} "
          f"{'TTFT p50':>9} {'ITL p50':>8} {'ITL p99':>8}")  # fmt: skip
    for r in rows:
        hf = (
            f"{r['hf_tok_s']:9.1f} {r['speedup']:6.2f} {r['hf_seq_tok_s']:8.1f} {r['speedup_seq']:6.2f}"
            if "hf_tok_s" in r
            else f"{'-':>9} {'-':>6} {'-':>8} {'-':>6}"
        )
        print(f"{r['preset']:8} {r['concurrency']:4d} {r['tok_s']:8.1f} {hf} {r['ttft_p50_ms']:8.0f}ms "
              f"{r['itl_p50_ms']:6.0f}ms {r['itl_p99_ms']:6.0f}ms")  # fmt: skip
    med = statistics.median([r["tok_s"] for r in rows]) if rows else 0
    print(f"(median engine throughput {med:.1f} tok/s)")


