"""Triton kernels vs their torch references at DeepSeek-V4-Flash decode shapes, on one CUDA device.

Each kernel's output is checked against its reference, then both are timed (median of
--reps launches, L2 flushed before each) next to the device's own ceilings measured in
the same run: a large device-to-device copy (GB/s) and a large bf16 matmul (TFLOP/s).
GB/s counts the bytes a kernel must move at least (weights, gathered rows, in and out),
so "% BW" reads as closeness to the memory roofline; "% FLOP" likewise for compute.

Needs torch >= 2.11 and Triton >= 3.6, not Ray. Without CUDA it prints a line and exits;
`--smoke` instead runs every case at toy shapes through Triton's interpreter on the CPU
(checks only: this script's own test).

  python benchmarks/kernels.py [--reps 20] [--only attn,fp8,pool]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

from kernels.compressor_pool import compressor_pool_ref, compressor_pool_triton  # noqa: E402
from kernels.fp4_grouped_gemm import fp4_grouped_gemm_ref, fp4_grouped_gemm_triton  # noqa: E402
from kernels.fp8_gemm import fp8_gemm_ref, fp8_gemm_triton  # noqa: E402
from kernels.indexer_topk import (  # noqa: E402
    indexer_topk_paged_ref,
    indexer_topk_paged_triton,
    indexer_topk_ref,
    indexer_topk_triton,
)
from kernels.quant import quant_fp8_weight  # noqa: E402
from kernels.rmsnorm_rope import rmsnorm_rope_ref, rmsnorm_rope_triton  # noqa: E402
from kernels.sinkhorn import sinkhorn_ref, sinkhorn_triton  # noqa: E402
from kernels.sparse_attention import sparse_attention_ref, sparse_attention_triton  # noqa: E402


@dataclass
class Case:
    name: str
    shape: str
    args: tuple[Any, ...]
    triton: Callable[..., torch.Tensor]
    ref: Callable[..., torch.Tensor]
    bytes: float  # the least bytes the op must move
    flops: float
    check: Callable[[torch.Tensor, torch.Tensor], tuple[bool, str]]


def _close(tol: float) -> Callable[[torch.Tensor, torch.Tensor], tuple[bool, str]]:
    def check(out: torch.Tensor, ref: torch.Tensor) -> tuple[bool, str]:
        err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30))
        return bool(err <= tol) and not bool(out.isnan().any()), f"rel {err:.1e}"

    return check


def _same_picks(out: torch.Tensor, ref: torch.Tensor) -> tuple[bool, str]:
    """Per row, the share of the reference's picks that the kernel also picked (near-ties may swap)."""
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(out, ref, strict=True))
    share = hits / max(1, ref.numel())
    return share >= 0.99, f"picks {share:.2%}"


def attention_cases(dev: torch.device, s: dict[str, int]) -> list[Case]:
    b, h, d, win, topk, ctx = s["batch"], s["heads"], s["head_dim"], s["window"], s["topk"], s["entries"]
    cases = []
    for name, length in (("attn swa", win), ("attn csa", win + topk)):
        rows_per_seq = win + ctx
        kv = torch.randn(b * rows_per_seq, d, device=dev).bfloat16()
        q = torch.randn(b, h, d, device=dev).bfloat16()
        own = torch.randint(0, rows_per_seq, (b, length), device=dev)  # each query gathers its own sequence's rows
        own += torch.arange(b, device=dev)[:, None] * rows_per_seq
        idx = torch.where(torch.rand(b, length, device=dev) < 0.05, -1, own).to(torch.int32)
        sink = torch.randn(h, device=dev)
        moved = b * length * d * 2 + 2 * b * h * d * 2 + idx.numel() * 4
        cases.append(Case(
            name, f"T={b} H={h} D={d} L={length}", (q, kv, idx, sink, d**-0.5),
            sparse_attention_triton, sparse_attention_ref, moved, 4 * b * h * length * d, _close(2e-2),
        ))  # fmt: skip
    return cases


def indexer_cases(dev: torch.device, s: dict[str, int]) -> list[Case]:
    nh, c, n, k = s["index_heads"], s["index_dim"], s["entries"], s["topk"]
    cases = []
    for name, t in (("indexer 1 query", 1), ("indexer chunk", s["chunk"])):
        q = torch.randn(t, nh, c, device=dev).bfloat16()
        w = torch.randn(t, nh, device=dev)
        keys = torch.randn(n, c, device=dev).bfloat16()
        vis = torch.full((t,), n, dtype=torch.int32, device=dev)
        cases.append(Case(
            name, f"T={t} nI={nh} cI={c} N={n} k={k}", (q, w, keys, vis, k),
            indexer_topk_triton, indexer_topk_ref, n * c * 2 + t * nh * (c * 2 + 4) + t * k * 4,
            2 * t * nh * c * n, _same_picks,
        ))  # fmt: skip
    b, epp = s["batch"], s["epp"]  # decode: every sequence its own n keys, on pages in shuffled pool order
    q = torch.randn(b, nh, c, device=dev).bfloat16()
    w = torch.randn(b, nh, device=dev)
    pool = torch.randn(b * n, c, device=dev).bfloat16()
    table = torch.randperm(b * n // epp, device=dev).view(b, n // epp)
    counts = torch.full((b,), n, dtype=torch.int64, device=dev)
    cases.append(Case(
        "indexer paged", f"B={b} nI={nh} cI={c} N={n} k={k} epp={epp}", (q, w, pool, table, epp, counts, k),
        indexer_topk_paged_triton, indexer_topk_paged_ref, b * (n * c * 2 + n // epp * 8 + nh * (c * 2 + 4) + k * 4),
        2 * b * nh * c * n, _same_picks,
    ))  # fmt: skip
    return cases


def fp4_cases(dev: torch.device, s: dict[str, int]) -> list[Case]:
    e, rows, dim, inter = s["experts"], s["batch"] * 6, s["dim"], s["inter"]
    counts = torch.bincount(torch.randint(0, e, (rows,), device=dev), minlength=e)
    offsets = torch.cat((counts.new_zeros(1), counts.cumsum(0)))
    active = int((counts > 0).sum())
    cases = []
    for name, n, k in (("fp4 moe w1", inter, dim), ("fp4 moe w2", dim, inter)):
        x = torch.randn(rows, k, device=dev).bfloat16()
        packed = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, device=dev)
        scale = torch.randint(118, 126, (e, n, k // 32), dtype=torch.uint8, device=dev)
        moved = active * n * (k // 2 + k // 32) + rows * (k + n) * 2
        cases.append(Case(
            name, f"P={rows} E={e} ({active} used) N={n} K={k}", (x, packed, scale, offsets),
            fp4_grouped_gemm_triton, fp4_grouped_gemm_ref, moved, 2 * rows * n * k, _close(2e-2),
        ))  # fmt: skip
    return cases


def fp8_cases(dev: torch.device, s: dict[str, int]) -> list[Case]:
    m, dim = s["batch"], s["dim"]
    shapes = {"wq_a": (s["q_lora"], dim), "wq_b": (s["heads"] * s["head_dim"], s["q_lora"]),
              "wo_b": (dim, s["o_in"]), "shared w1": (s["inter"], dim)}  # fmt: skip
    cases = []
    for name, (n, k) in shapes.items():
        w, scale = quant_fp8_weight(torch.randn(n, k, device=dev) * 0.05)
        x = torch.randn(m, k, device=dev).bfloat16()
        moved = n * k + scale.numel() + m * (k + n) * 2
        cases.append(Case(
            f"fp8 {name}", f"M={m} N={n} K={k}", (x, w, scale), fp8_gemm_triton, fp8_gemm_ref, moved,
            2 * m * n * k, _close(2e-2),
        ))  # fmt: skip
    return cases


def small_cases(dev: torch.device, s: dict[str, int]) -> list[Case]:
    t, h, d = s["batch"], s["heads"], s["head_dim"]
    cases = []
    for tokens in (t, s["chunk"] * 16):
        logits = torch.randn(tokens, 4, 4, device=dev)
        cases.append(Case(
            "sinkhorn", f"T={tokens} n=4 iters=20", (logits, 20, 1e-6), sinkhorn_triton, sinkhorn_ref,
            2 * logits.numel() * 4, tokens * 20 * 4 * 16, _close(1e-4),
        ))  # fmt: skip
    angles = torch.rand(t, 32, device=dev) * 100
    q = torch.randn(t, h, d, device=dev).bfloat16()
    kv = torch.randn(t, d, device=dev).bfloat16()
    for name, x, w in (("rmsnorm+rope q", q, None), ("rmsnorm+rope kv", kv, torch.rand(d, device=dev) + 0.5)):
        cases.append(Case(
            name, f"x {list(x.shape)} rd=64", (x, w, angles.cos(), angles.sin(), 1e-6), rmsnorm_rope_triton,
            rmsnorm_rope_ref, 2 * x.numel() * 2 + 2 * angles.numel() * 4, 6 * x.numel(), _close(2e-2),
        ))  # fmt: skip
    return cases


def pool_cases(dev: torch.device, s: dict[str, int]) -> list[Case]:
    """Decode: `batch` blocks close at once; ratio 4 reads its previous and own block from one ring gather."""
    n = s["batch"]
    cases = []
    for name, r, c in (("pool csa", 4, s["head_dim"]), ("pool csa index", 4, s["index_dim"]),
                       ("pool hca", 128, s["head_dim"])):  # fmt: skip
        if r == 4:
            rows_kv, rows_score = torch.randn(n, 2 * r, 2 * c, device=dev), torch.randn(n, 2 * r, 2 * c, device=dev)
            args = (rows_kv[:, r:], rows_score[:, r:], rows_kv[:, :r], rows_score[:, :r])
        else:
            args = (torch.randn(n, r, c, device=dev), torch.randn(n, r, c, device=dev))
        slots = 2 * r if r == 4 else r  # the kernel reads only the half of each 2c row that it pools
        cases.append(Case(
            name, f"n={n} r={r} c={c}", args, compressor_pool_triton, compressor_pool_ref,
            2 * n * slots * c * 4 + n * c * 4, 5 * n * slots * c, _close(1e-4),
        ))  # fmt: skip
    return cases


FLASH = dict(batch=64, heads=64, head_dim=512, window=128, topk=512, entries=16384, index_heads=64, index_dim=128,
             epp=32, chunk=128, experts=256, dim=4096, inter=2048, q_lora=1024, o_in=8192)  # fmt: skip
SMOKE = dict(batch=3, heads=16, head_dim=64, window=16, topk=16, entries=80, index_heads=8, index_dim=32,
             epp=8, chunk=4, experts=4, dim=128, inter=64, q_lora=128, o_in=256)  # fmt: skip
GROUPS = {"attn": attention_cases, "indexer": indexer_cases, "fp4": fp4_cases, "fp8": fp8_cases, "small": small_cases,
          "pool": pool_cases}  # fmt: skip


def time_ms(fn: Callable[[], Any], reps: int, flush: torch.Tensor | None) -> float:
    """Median milliseconds of `reps` launches, the L2 flushed (outside the timed span) before each."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_gbs(dev: torch.device, reps: int) -> float:
    """GB/s of a 2 GiB device-to-device copy (read + write), measured now."""
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / time_ms(lambda: dst.copy_(src), reps, None) / 1e6


def matmul_tflops(dev: torch.device, reps: int) -> float:
    """TFLOP/s of an 8192^3 bf16 matmul, measured now."""
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    return 2 * 8192**3 / time_ms(lambda: a @ b, reps, None) / 1e9


def run(cases: list[Case], reps: int, bw: float, peak: float, timing: bool) -> bool:
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=cases[0].args[0].device) if timing else None
    head = f"{'kernel':<17} {'shape':<38} {'check':<15} {'triton ms':>9} {'ref ms':>9} {'x ref':>6}"
    print(head + (f" {'GB/s':>7} {'% BW':>5} {'TFLOP/s':>7} {'% FLOP':>6}" if timing else ""))
    ok_all = True
    for c in cases:
        ok, note = c.check(c.triton(*c.args), c.ref(*c.args))
        ok_all &= ok
        line = f"{c.name:<17} {c.shape:<38} {('ok ' if ok else 'BAD ') + note:<15}"
        if timing:
            ms = time_ms(lambda c=c: c.triton(*c.args), reps, flush)
            ref_ms = time_ms(lambda c=c: c.ref(*c.args), max(1, reps // 5), flush)
            gbs, tf = c.bytes / ms / 1e6, c.flops / ms / 1e9
            line += f" {ms:9.3f} {ref_ms:9.3f} {ref_ms / ms:6.1f} {gbs:7.0f} {gbs / bw:5.0%} {tf:7.1f} {tf / peak:6.1%}"
        print(line, flush=True)
    return ok_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--only", default="", help=f"comma-separated groups of {', '.join(GROUPS)}")
    parser.add_argument("--smoke", action="store_true", help="toy shapes on the CPU interpreter, checks only")
    args = parser.parse_args(argv)
    groups = [g for g in GROUPS if not args.only or g in args.only.split(",")]
    if args.smoke:
        torch.manual_seed(0)
        cases = [c for g in groups for c in GROUPS[g](torch.device("cpu"), SMOKE)]
        return 0 if run(cases, 1, 1.0, 1.0, timing=False) else 1
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time")
        return 0
    import triton

    dev = torch.device("cuda")
    torch.manual_seed(0)
    bw, peak = copy_gbs(dev, args.reps), matmul_tflops(dev, args.reps)
    print(f"{torch.cuda.get_device_name(dev)}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"ceilings: copy {bw:.0f} GB/s, bf16 matmul {peak:.0f} TFLOP/s\n")
    cases = [c for g in groups for c in GROUPS[g](dev, FLASH)]
    return 0 if run(cases, args.reps, bw, peak, timing=True) else 1


if __name__ == "__main__":
    sys.exit(main())
