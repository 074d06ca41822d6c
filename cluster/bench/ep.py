"""`dsv4 bench ep`: expert parallelism in one process: decode step time at W = 1, 2, 4
workers, and the share of it in dispatch + combine (from `router.stats`), with bytes per
step and balancedness."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cluster.bench import BenchError
from workers.presets import PRESETS, preset_config
from workers.step import SamplingParams, SeqWork, StepPlan, StepResult

if TYPE_CHECKING:  # torch is imported when a benchmark runs, not when the CLI starts
    import torch

    from router.stats import LayerStats
    from workers.model import Transformer


class _Executor(Protocol):
    def execute(self, plan: StepPlan) -> StepResult: ...


def bench_ep_main(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from cluster.assembly.build import compute_dtype
    from cluster.assembly.model_cache import ensure_preset_checkpoint

    presets, worker_counts = _ep_runs(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = compute_dtype(args.dtype, device="cpu")
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
    """The presets and worker counts asked for, checked (BenchError: the CLI prints it, exit 2)."""
    presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in presets if p not in PRESETS]
    if not presets or unknown:
        raise BenchError(f"unknown preset(s) {unknown or presets}; known: {', '.join(PRESETS)}")
    try:
        worker_counts = [int(w) for w in args.workers.split(",") if w]
    except ValueError:
        raise BenchError(f"--workers {args.workers!r}: want comma-separated integers") from None
    if not worker_counts or min(worker_counts) < 1 or min(args.batch, args.prompt_len, args.steps) < 1:
        raise BenchError("--workers, --batch, --prompt-len and --steps must be positive")
    for p in presets:
        e = preset_config(p).n_routed_experts
        if any(e % w for w in worker_counts):
            raise BenchError(f"preset {p!r} has {e} routed experts: every W in --workers must divide it")
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
    from cluster.backends.local import LocalWorkerGroup
    from workers.ep import count_routing
    from workers.weights import load_model
    from workers.worker import ModelWorker

    if world_size == 1:
        model = load_model(ckpt, dtype=dtype, progress=False)
        count_routing(model)
        return ModelWorker(model), [model]
    group = LocalWorkerGroup.load(ckpt, world_size, dtype=dtype)
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
