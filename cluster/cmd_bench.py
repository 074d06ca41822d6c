"""Benchmarks.

- `dsv4 bench serve`: the engine's throughput and latency at several concurrencies, next
  to HF transformers' `generate` on the same checkpoint and prompts, in the same run.
- `dsv4 bench ep`: expert parallelism in one process: decode step time at W = 1, 2, 4
  workers, and the share of it in dispatch + combine (from `router.stats`), with bytes per
  step and balancedness.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cluster.cmd_model import UsageError, torch_dtype
from cluster.messages import GenerateRequest, RequestOutput, SamplingParams, SeqWork, StepPlan, StepResult
from workers.presets import PRESETS, preset_config

if TYPE_CHECKING:  # torch is imported when a benchmark runs, not when the CLI starts
    import torch

    from router.stats import LayerStats
    from workers.model import Transformer

DTYPES = ("auto", "float32", "bfloat16")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (reported as ratios against a baseline run alongside)")
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    p = bsub.add_parser(
        "serve",
        help="engine output tokens/s, TTFT and inter-token latency vs HF generate",
        description="Runs the in-process engine and HF transformers' generate on the same random prompts "
        "(greedy, fixed length) at each concurrency, and prints both with their ratio.",
    )
    p.add_argument("--presets", default="tiny,small", help="comma-separated model presets (default: tiny,small)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrencies (default: 1,8,32)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request (default: 64)")
    p.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request (default: 32)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="compute dtype (default: auto = bfloat16 where the CPU has native bf16, else float32)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    p.add_argument("--json", help="also write the results to this file")
    p.set_defaults(func=bench_serve_main)
    _add_ep_parser(bsub)


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

    from cluster.engine import EngineConfig
    from cluster.inprocess import build_engine
    from cluster.model_cache import ensure_preset_checkpoint
    from workers.layers import default_cpu_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; known: {', '.join(PRESETS)}")
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    rows = []
    for preset in presets:
        ckpt = ensure_preset_checkpoint(preset)
        dtype = torch_dtype(args.dtype) or default_cpu_dtype()
        engine = build_engine(ckpt, dtype=dtype, progress=False,
                              engine_config=EngineConfig(max_running=max(concurrencies)))  # fmt: skip
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


# -- dsv4 bench ep ------------------------------------------------------------------------

EP_DESCRIPTION = """\
Expert parallelism in one process. For each preset and each W, loads the checkpoint into W
workers (W = 1: one plain worker with every expert; W > 1: W workers on threads, E/W routed
experts each, exchanging tokens through the `local` communicator), prefills BATCH random
prompts of PROMPT_LEN tokens spread over the workers, runs WARMUP decode steps, then times
STEPS decode steps (every sequence gets one token per step). Columns:

  step ms      median wall time of one decode step of the whole batch
  tok/s        BATCH / mean step time
  a2a %        share of step time inside dispatch + combine, mean over workers; it includes
               waiting for the slowest peer at each collective (W threads share the cores)
  min %        the same for the worker that spent least there: nearer the exchange alone
  disp/comb ms time inside dispatch / combine per step, summed over layers, mean over workers
  KiB/step     bytes sent by dispatch + combine per step, all workers, rows to oneself included
  remote       the part of it sent to other workers
  expert bal   mean/max of tokens per expert, per layer, averaged over the MoE layers (1 = even)
  worker bal   mean/max of rows received per worker, likewise (W > 1)

Presets are random-weight checkpoints made on first use in $DSV4_CACHE (~/.cache/dsv4)."""


class _Executor(Protocol):
    def execute(self, plan: StepPlan) -> StepResult: ...


def _add_ep_parser(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser(
        "ep",
        help="expert-parallel decode step time and all-to-all share at W = 1, 2, 4 in-process workers",
        description=EP_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--presets", default="tiny,small", help="comma-separated model presets (default: tiny,small)")
    p.add_argument("--workers", default="1,2,4", help="comma-separated worker counts W (default: 1,2,4)")
    p.add_argument("--batch", type=int, default=32, help="sequences decoded together (default: 32)")
    p.add_argument("--prompt-len", type=int, default=32, help="prefill tokens per sequence (default: 32)")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps (default: 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps first (default: 2)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="compute dtype (default: auto = bfloat16 where the CPU has native bf16, else float32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, shared by the W workers (default: 1)")
    p.add_argument("--json", help="also write the results to this file")
    p.set_defaults(func=bench_ep_main)


def bench_ep_main(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from cluster.model_cache import ensure_preset_checkpoint
    from workers.layers import default_cpu_dtype

    presets, worker_counts = _ep_runs(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch_dtype(args.dtype) or default_cpu_dtype()
    runs = [(p, w) for p in presets for w in worker_counts]
    rows = []
    bar = tqdm(runs, desc="bench ep", unit="run")
    for preset, w in bar:
        bar.set_postfix_str(f"{preset} W={w}")
        rows.append({"preset": preset, "workers": w, **run_ep(ensure_preset_checkpoint(preset), w, dtype, args)})
    print_ep_table(rows, args, dtype)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args) | {"func": None}, "rows": rows}, indent=2))


def _ep_runs(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """The presets and worker counts asked for, checked (UsageError: the CLI prints it, exit 2)."""
    presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in presets if p not in PRESETS]
    if not presets or unknown:
        raise UsageError(f"unknown preset(s) {unknown or presets}; known: {', '.join(PRESETS)}")
    try:
        worker_counts = [int(w) for w in args.workers.split(",") if w]
    except ValueError:
        raise UsageError(f"--workers {args.workers!r}: want comma-separated integers") from None
    if not worker_counts or min(worker_counts) < 1 or min(args.batch, args.prompt_len, args.steps) < 1:
        raise UsageError("--workers, --batch, --prompt-len and --steps must be positive")
    for p in presets:
        e = preset_config(p).n_routed_experts
        if any(e % w for w in worker_counts):
            raise UsageError(f"preset {p!r} has {e} routed experts: every W in --workers must divide it")
    return presets, worker_counts


def run_ep(ckpt: Path, world_size: int, dtype: torch.dtype, args: argparse.Namespace) -> dict:
    """One run: load W workers, prefill, decode; -> the row's measurements."""
    import gc

    import torch

    worker, models = _ep_workers(ckpt, world_size, dtype)
    gen = torch.Generator().manual_seed(0)
    vocab = models[0].cfg.vocab_size
    prompts = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=gen).tolist()
    uids = [f"b{i}" for i in range(args.batch)]
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    result = worker.execute(StepPlan(
        work=tuple(SeqWork(u, tuple(p), 0, sample=True) for u, p in zip(uids, prompts, strict=True)),
        sampling=dict.fromkeys(uids, greedy), num_generated=dict.fromkeys(uids, 0),
    ))  # fmt: skip
    times = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:  # start the window: drop what prefill and warm-up recorded
            for m in models:
                m.dispatch_stats.snapshot()
        pos = args.prompt_len + i
        plan = StepPlan(work=tuple(SeqWork(u, (result.tokens[u],), pos, sample=True) for u in uids),
                        num_generated=dict.fromkeys(uids, i + 1))  # fmt: skip
        t0 = time.perf_counter()
        result = worker.execute(plan)
        times.append(time.perf_counter() - t0)
    snaps = [m.dispatch_stats.snapshot() for m in models]
    del worker, models
    gc.collect()
    return summarize_ep(times[args.warmup :], snaps, args.batch)


def _ep_workers(ckpt: Path, world_size: int, dtype: torch.dtype) -> tuple[_Executor, list[Transformer]]:
    """(W = 1: a ModelWorker, else a LocalWorkerGroup; the models whose `dispatch_stats` to read)."""
    from cluster.worker_group import LocalWorkerGroup
    from workers.ep import count_routing
    from workers.weights import load_model
    from workers.worker import ModelWorker

    if world_size == 1:
        model = load_model(ckpt, dtype=dtype, progress=False)
        count_routing(model)
        return ModelWorker(model), [model]
    group = LocalWorkerGroup(ckpt, world_size, dtype=dtype)
    return group, [w.model for w in group.workers]


def summarize_ep(times: list[float], snaps: list[dict[int, LayerStats]], batch: int) -> dict:
    """Step times [s] and each worker's stats snapshot over those steps -> the table's numbers."""
    from router.stats import merge

    steps, wall = len(times), sum(times)
    comm = [sum(s.comm_s for s in snap.values()) for snap in snaps]  # per worker, over the window
    merged = merge(snaps)
    worker_bal = []
    for layer in merged:
        recv = [snap[layer].rows_recv for snap in snaps if layer in snap]
        if max(recv, default=0) > 0:
            worker_bal.append(statistics.fmean(recv) / max(recv))
    expert_bal = [s.balancedness for s in merged.values() if s.num_tokens]
    n = len(snaps)
    return {
        "step_ms": statistics.median(times) * 1000,
        "tok_s": batch * steps / wall,
        "a2a_share": statistics.fmean(comm) / wall,
        "a2a_share_min": min(comm) / wall,
        "dispatch_ms": sum(s.dispatch_s for s in merged.values()) / n / steps * 1000,
        "combine_ms": sum(s.combine_s for s in merged.values()) / n / steps * 1000,
        "bytes_per_step": sum(s.bytes_sent for s in merged.values()) / steps,
        "remote_bytes_per_step": sum(s.remote_bytes_sent for s in merged.values()) / steps,
        "expert_balancedness": statistics.fmean(expert_bal) if expert_bal else float("nan"),
        "worker_balancedness": statistics.fmean(worker_bal) if worker_bal else float("nan"),
        "moe_layers": len(merged),
    }


def print_ep_table(rows: list[dict], args: argparse.Namespace, dtype: torch.dtype) -> None:
    import torch

    print(f"\ndsv4 bench ep: torch {torch.__version__}, {torch.get_num_threads()} threads, {dtype}, "
          f"batch {args.batch}, prompt {args.prompt_len} tokens, "
          f"{args.steps} decode steps after {args.warmup}\n")  # fmt: skip
    print("| preset | W | step ms | tok/s | a2a % | min % | disp ms | comb ms | KiB/step | remote KiB/step "
          "| expert bal | worker bal |")  # fmt: skip
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        worker_bal = f"{r['worker_balancedness']:.2f}" if r["workers"] > 1 else "-"
        cells = [r["preset"], str(r["workers"]), f"{r['step_ms']:.1f}", f"{r['tok_s']:.1f}",
                 f"{100 * r['a2a_share']:.1f}", f"{100 * r['a2a_share_min']:.1f}",
                 f"{r['dispatch_ms']:.2f}", f"{r['combine_ms']:.2f}",
                 f"{r['bytes_per_step'] / 1024:.1f}", f"{r['remote_bytes_per_step'] / 1024:.1f}",
                 f"{r['expert_balancedness']:.2f}", worker_bal]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
