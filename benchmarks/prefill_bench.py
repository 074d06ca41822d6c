"""Prefill time against prompt length with 1, 2 and 4 workers: context-parallel prefill
(each chunk split over the instance's workers, workers/cp.py) next to the same workers
without it (expert parallelism only: one worker runs the prompt's attention).

One instance of W in-process workers (threads; each runs torch single-threaded, so W
workers use up to W cores); one request of N random tokens, `max_tokens` 1, so the time to
its first token is the prefill. Ratios are against W = 1 at the same N, in the same run.

Run from the repository root:  python benchmarks/prefill_bench.py [--preset tiny]
    [--tokens 2048,8192,32768] [--workers 1,2,4] [--chunk 4096]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cluster.assembly.build import build_instance  # noqa: E402
from cluster.assembly.manifest import parse_manifest  # noqa: E402
from cluster.assembly.model_cache import ensure_preset_checkpoint  # noqa: E402
from cluster.engine.engine import Engine  # noqa: E402
from cluster.engine.requests import GenerateRequest, RequestOutput  # noqa: E402
from workers.step import SamplingParams  # noqa: E402


def prefill_seconds(engine: Engine, n: int, uid: str, gen: torch.Generator) -> float:
    """Submit one prompt of n tokens and wait for its only token."""
    done = threading.Event()
    error: list[str] = []

    def sink(out: RequestOutput) -> None:
        if out.finish_reason is not None:
            if out.error:
                error.append(out.error)
            done.set()

    ids = tuple(torch.randint(3, 120000, (n,), generator=gen).tolist())
    t0 = time.perf_counter()
    engine.submit(GenerateRequest(uid, ids, SamplingParams(max_tokens=1, temperature=0.0)), sink)
    if not done.wait(3600):
        raise TimeoutError(f"{uid}: no answer within an hour")
    if error:
        raise RuntimeError(f"{uid}: {error[0]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="model preset (a random checkpoint is cached on first use)")
    ap.add_argument("--tokens", default="2048,8192,32768", help="prompt lengths, comma-separated")
    ap.add_argument("--workers", default="1,2,4", help="workers per instance, comma-separated")
    ap.add_argument("--chunk", type=int, default=4096, help="max_batch_tokens: the prefill chunk per step")
    ap.add_argument("--kv-gib", type=float, default=4.0, help="KV cache per instance")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lengths = [int(x) for x in args.tokens.split(",")]
    sizes = [int(x) for x in args.workers.split(",")]
    ckpt = ensure_preset_checkpoint(args.preset)
    scheduler = {"max_batch_tokens": args.chunk, "max_model_len": max(lengths) + 8, "prefix_cache": False,
                 "kv_cache_bytes": int(args.kv_gib * 2**30)}  # fmt: skip
    setups = [(w, cp) for w in sizes for cp in ((False,) if w == 1 else (False, True))]
    seconds: dict[tuple[int, bool, int], float] = {}
    gen = torch.Generator().manual_seed(0)
    bar = tqdm(total=len(setups) * len(lengths), desc="prefill runs", unit="run")
    for w, cp in setups:
        manifest = parse_manifest({"model": {"dtype": "float32"}, "scheduler": scheduler,
                                   "instance": {"workers": w, "context_parallel_min_tokens": w if cp else 0}})
        engine = build_instance(manifest, checkpoint=ckpt)
        prefill_seconds(engine, 256, "warmup", gen)
        for n in lengths:
            seconds[w, cp, n] = prefill_seconds(engine, n, f"w{w}-{cp}-{n}", gen)
            bar.update()
        engine.stop()
    bar.close()
    print(f"\nprefill, preset {args.preset}, chunk {args.chunk} tokens; tok/s (x vs 1 worker at the same length)\n")
    print("| workers | context parallel | " + " | ".join(f"{n} tokens" for n in lengths) + " |")
    print("|---|---|" + "---|" * len(lengths))
    for w, cp in setups:
        cells = [f"{n / seconds[w, cp, n]:.0f} ({seconds[1, False, n] / seconds[w, cp, n]:.2f}x)" for n in lengths]
        print(f"| {w} | {'yes' if cp else 'no'} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
