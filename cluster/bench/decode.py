"""`dsv4 bench decode`: the decode step alone, at several batch sizes, against its roofline
on this machine and against HF transformers' decode step on the same checkpoint.

Per preset and batch size B: B random prompts are prefilled through a `ModelWorker` (the
object every backend runs), then decode steps (one token per sequence, greedy, sampled by
the worker's sampler) are timed. One more step runs under torch.profiler and is counted:

  aten ops     top-level aten calls of the step (those no other aten call made)
  host syncs   `_local_scalar_dense` (item, bool, int) and `nonzero` calls, at any depth,
               except those inside `_grouped_mm`: its CPU implementation reads the group
               offsets, its CUDA kernel does not
  roofline     max(bytes / bandwidth, FLOPs / matmul rate), both measured here first: bytes
               are the weights the step touches (every layer's, the head, the B embedding
               rows and the routed experts its tokens picked) plus the B sequences' KV state
               (an upper bound on what attention reads); FLOPs are 2 x the parameters each
               token multiplies by (its K experts, not all E) x B
  HF           DeepseekV4ForCausalLM.generate on the same prompts as one static batch:
               (time of 1 + S new tokens - time of 1 new token) / S

Ours runs as served (the manifest's defaults: quantization simulation on); HF has none.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.bench import BenchError
from workers.presets import PRESETS
from workers.step import SamplingParams, SeqWork, StepPlan

if TYPE_CHECKING:  # torch is imported when the benchmark runs, not when the CLI starts
    import torch

    from workers.model import Transformer
    from workers.worker import ModelWorker

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")
SYNC_FREE_ON_GPU = ("aten::_grouped_mm",)  # CPU implementations that read offsets; one kernel on CUDA
PROMPT_SEED = 0


@dataclass(frozen=True)
class Machine:
    bandwidth: float  # bytes/s, streaming copy (read + write counted)
    flops: float  # FLOP/s, a large square matmul in the model's dtype


def bench_decode_main(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from cluster.assembly.build import compute_dtype, serving_threads
    from cluster.assembly.model_cache import ensure_preset_checkpoint
    from workers.weights import load_model

    presets, batches = _runs(args)
    torch.set_num_threads(serving_threads(args.threads))
    dtype = compute_dtype(args.dtype, device="cpu")
    machine = measure_machine(dtype)
    rows = []
    for preset in presets:
        ckpt = ensure_preset_checkpoint(preset)
        model = load_model(ckpt, dtype=dtype, progress=False)
        hf = None if args.no_hf else _load_hf(ckpt, dtype)
        for b in tqdm(batches, desc=f"bench decode {preset}", unit="batch"):
            row = {"preset": preset, "batch": b, **run_decode(model, b, args, machine)}
            if hf is not None:
                row["hf_ms"] = hf_step_ms(hf, model.cfg.vocab_size, b, args)
                row["speedup"] = row["hf_ms"] / row["step_ms"]
            rows.append(row)
    print_table(rows, args, dtype, machine)
    if args.json:
        doc = {"args": vars(args) | {"func": None}, "machine": vars(machine), "rows": rows}
        Path(args.json).write_text(json.dumps(doc, indent=2))


def _runs(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in presets if p not in PRESETS]
    if not presets or unknown:
        raise BenchError(f"unknown preset(s) {unknown or presets}; known: {', '.join(PRESETS)}")
    try:
        batches = [int(b) for b in args.batch.split(",") if b]
    except ValueError:
        raise BenchError(f"--batch {args.batch!r}: want comma-separated integers") from None
    if not batches or min(batches) < 1 or args.steps < 1:
        raise BenchError(f"--batch sizes and --steps must be >= 1, got {args.batch!r}, {args.steps}")
    return presets, batches


# -- the machine ---------------------------------------------------------------------------
def measure_machine(dtype: torch.dtype) -> Machine:
    """Streaming copy bandwidth and matmul rate, best of a few runs (the roofline's denominators)."""
    import torch

    src = torch.ones(32 * 2**20, dtype=torch.float32)  # 128 MiB: past every cache
    dst = torch.empty_like(src)
    copy_s = _best(lambda: dst.copy_(src), 5)
    a = torch.randn(1024, 1024).to(dtype)
    mm_s = _best(lambda: a @ a, 5)
    return Machine(bandwidth=2 * src.numel() * 4 / copy_s, flops=2 * 1024**3 / mm_s)


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# -- our step --------------------------------------------------------------------------------
def run_decode(model: Transformer, batch: int, args: argparse.Namespace, machine: Machine) -> dict:
    """Prefill `batch` prompts, time `args.steps` decode steps, profile one, price it."""
    from workers.worker import ModelWorker

    worker = ModelWorker(model)
    uids = [f"d{i}" for i in range(batch)]
    tokens = _prefill(worker, uids, _prompts(model.cfg.vocab_size, batch, args.prompt_len))
    pos = [args.prompt_len]

    def step() -> None:
        plan = StepPlan(tuple(SeqWork(u, (tokens[u],), pos[0], True) for u in uids))
        tokens.update(worker.execute(plan).tokens)
        pos[0] += 1

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    worker.routing_window()  # start the window the profiled step fills
    ops, syncs = profile_step(step)
    experts_used = [int((s.tokens_per_expert > 0).sum()) for s in worker.routing_window().values()]
    cost = step_cost(model, worker, uids, experts_used)
    step_ms = statistics.median(times) * 1e3
    roof_ms = max(cost["bytes"] / machine.bandwidth, cost["flops"] / machine.flops) * 1e3
    for uid in uids:
        worker.release(uid)
    return {
        "step_ms": step_ms, "tok_s": batch / (step_ms / 1e3), "aten_ops": ops,
        "ops_per_layer": ops / model.cfg.num_hidden_layers, "host_syncs": syncs,
        "mbytes": cost["bytes"] / 1e6, "gflops": cost["flops"] / 1e9, "roofline_ms": roof_ms,
        "roofline_pct": 100 * roof_ms / step_ms,
    }  # fmt: skip


def _prompts(vocab: int, batch: int, length: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(PROMPT_SEED)
    return torch.randint(3, vocab, (batch, length), generator=gen).tolist()


def _prefill(worker: ModelWorker, uids: list[str], prompts: list[list[int]]) -> dict[str, int]:
    greedy = SamplingParams(temperature=0.0)
    plan = StepPlan(tuple(SeqWork(u, tuple(p), 0, True) for u, p in zip(uids, prompts, strict=True)),
                    sampling=dict.fromkeys(uids, greedy))  # fmt: skip
    return dict(worker.execute(plan).tokens)


def profile_step(step) -> tuple[int, int]:
    """(top-level aten calls, host syncs) of one call of `step` (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = syncs = 0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        ancestors = _aten_ancestors(event)
        ops += not ancestors
        syncs += event.name in SYNC_OPS and not any(a in SYNC_FREE_ON_GPU for a in ancestors)
    return ops, syncs


def _aten_ancestors(event) -> list[str]:
    out, parent = [], event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            out.append(parent.name)
        parent = parent.cpu_parent
    return out


def step_cost(model: Transformer, worker: ModelWorker, uids: list[str], experts_used: list[int]) -> dict[str, float]:
    """Bytes a decode step must move and FLOPs it must do (see the module docstring)."""
    cfg, batch = model.cfg, len(uids)
    dense_bytes = dense_params = expert_bytes = expert_params = 0
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if name.startswith("mtp.") or name == "embed.weight" or _is_index(t):
            continue
        size = t.numel() * t.element_size()
        if ".ffn.experts." in name:
            expert_bytes += size
            expert_params += t.numel()
        else:
            dense_bytes += size
            dense_params += t.numel()
    moe_layers = max(1, len(experts_used))
    per_expert_bytes = expert_bytes / (moe_layers * cfg.n_routed_experts)
    per_expert_params = expert_params / (moe_layers * cfg.n_routed_experts)
    kv = sum(model.kv.export(worker.states[u]).nbytes() for u in uids)
    embed_rows = batch * cfg.hidden_size * model.embed.weight.element_size()
    touched = dense_bytes + embed_rows + per_expert_bytes * sum(experts_used) + kv
    flops = 2 * batch * (dense_params + per_expert_params * cfg.num_experts_per_tok * moe_layers)
    return {"bytes": touched, "flops": flops}


def _is_index(t: torch.Tensor) -> bool:
    """Lookup tables (hash routing's tid2eid, expert id maps): a step reads B rows of them, not all."""
    import torch

    return t.dtype in (torch.int32, torch.int64, torch.bool)


# -- HF ---------------------------------------------------------------------------------------
def _load_hf(ckpt: Path, dtype: torch.dtype):
    import transformers

    return transformers.DeepseekV4ForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()


def hf_step_ms(hf, vocab: int, batch: int, args: argparse.Namespace) -> float:
    """HF's decode step: generate 1 + S tokens and 1 token on the same batch; the difference / S."""
    import torch

    ids = torch.tensor(_prompts(vocab, batch, args.prompt_len))

    def generate(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False)  # fmt: skip
        return time.perf_counter() - t0

    generate(2)  # warm-up
    s = args.steps
    return max(0.0, min(generate(1 + s) for _ in range(2)) - min(generate(1) for _ in range(2))) / s * 1e3


# -- report -----------------------------------------------------------------------------------
def print_table(rows: list[dict], args: argparse.Namespace, dtype: torch.dtype, machine: Machine) -> None:
    import torch

    print(f"\ndsv4 bench decode: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{str(dtype).removeprefix('torch.')}, prompts of {args.prompt_len} tokens, {args.steps} timed steps; "
          f"machine: {machine.bandwidth / 1e9:.1f} GB/s copy, {machine.flops / 1e9:.0f} GFLOP/s matmul")  # fmt: skip
    print(f"{'preset':8} {'batch':>5} {'ms/step':>8} {'tok/s':>8} {'ops':>6} {'ops/layer':>9} {'syncs':>5} "
          f"{'MB':>7} {'GFLOP':>6} {'roof ms':>7} {'% roof':>6} {'HF ms':>7} {'x HF':>5}")  # fmt: skip
    for r in rows:
        hf = f"{r['hf_ms']:7.1f} {r['speedup']:5.2f}" if "hf_ms" in r else f"{'-':>7} {'-':>5}"
        print(f"{r['preset']:8} {r['batch']:5d} {r['step_ms']:8.1f} {r['tok_s']:8.1f} {r['aten_ops']:6d} "
              f"{r['ops_per_layer']:9.0f} {r['host_syncs']:5d} {r['mbytes']:7.1f} {r['gflops']:6.2f} "
              f"{r['roofline_ms']:7.2f} {r['roofline_pct']:6.1f} {hf}")  # fmt: skip
