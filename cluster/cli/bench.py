"""`dsv4 bench serve`, `ep`, `decode` and `soak`: their arguments (the benchmarks are in cluster/bench/)."""

from __future__ import annotations

import argparse

from workers.presets import PRESETS  # noqa: F401  (for the help texts' preset names)

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
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default: as dsv4 serve picks them: all cores but one)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    p.add_argument("--json", help="also write the results to this file")
    p.set_defaults(func=_bench_serve)
    _add_ep_parser(bsub)
    _add_decode_parser(bsub)
    _add_soak_parser(bsub)


def _add_soak_parser(bsub: argparse._SubParsersAction) -> None:
    from cluster.bench import soak

    p = bsub.add_parser("soak", help="minutes to hours of mixed, hostile load: canaries, pages, RSS, latency drift",
                        description=soak.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--minutes", type=float, default=2.0, help="how long to soak (default: 2)")
    p.add_argument("--concurrency", type=int, default=16, help="clients calling at once (default: 16)")
    p.add_argument("--target", help="soak a running gateway HOST:PORT (default: start dsv4 serve for the run)")
    p.add_argument("-m", "--manifest", help="the manifest of the server it starts (default: --preset, float32)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="the model it serves (default: tiny)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="its dtype (default float32: canary tokens must not depend on the batch; bf16 batch "
                   "invariance is not built)")  # fmt: skip
    p.add_argument("--max-prompt", type=int, default=200, help="prompt tokens at most (default: 200)")
    p.add_argument("--max-tokens", type=int, default=48, help="output tokens at most (default: 48)")
    p.add_argument("--seed", type=int, default=0, help="the clients' seed (default: 0)")
    p.add_argument("--settle-s", type=float, default=8.0,
                   help="seconds idle before the final RSS reading (default: 8)")  # fmt: skip
    p.add_argument("--json", help="also write the report to this file")
    p.set_defaults(func=_bench_soak)


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
    p.set_defaults(func=_bench_ep)




def _add_decode_parser(bsub: argparse._SubParsersAction) -> None:
    from cluster.bench import decode

    p = bsub.add_parser(
        "decode",
        help="the decode step alone: ms, tok/s, aten ops, host syncs, % of roofline, vs HF's decode step",
        description=decode.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--presets", default="tiny,small", help="comma-separated model presets (default: tiny,small)")
    p.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes (default: 1,8,32)")
    p.add_argument("--prompt-len", type=int, default=64, help="prefill tokens per sequence (default: 64)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps (default: 16)")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps first (default: 3)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="compute dtype (default: auto = bfloat16 where the CPU has native bf16, else float32)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default: as dsv4 serve picks them: all cores but one)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    p.add_argument("--json", help="also write the results to this file")
    p.set_defaults(func=_bench_decode)


def _bench_decode(args: argparse.Namespace) -> None:
    from cluster.bench.decode import bench_decode_main

    bench_decode_main(args)


def _bench_serve(args: argparse.Namespace) -> None:
    from cluster.bench.serve import bench_serve_main

    bench_serve_main(args)


def _bench_soak(args: argparse.Namespace) -> None:
    from cluster.bench.soak import bench_soak_main

    if bench_soak_main(args):
        raise SystemExit(1)


def _bench_ep(args: argparse.Namespace) -> None:
    from cluster.bench.ep import bench_ep_main

    bench_ep_main(args)
