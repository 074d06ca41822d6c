"""A real long-context request end to end: chunked prefill on a prefill instance, KV
handoff, decode on a decode instance (`DisaggRouter` in one process), with wall time,
handoff bytes and peak memory per prompt length.

The prompt is random token ids (`--tokens` of them); the engines run their own scheduler
(prefill chunks of `--chunk` tokens). The KV cache a request needs follows V4's arithmetic
(`KVLayout.bytes_for`: fixed rings plus per-token compressed entries and indexer keys) and
is reserved up front on both instances, so the pools never grow mid-run. Peak memory is
the process's high-water mark (VmHWM); what the forward passes need beyond the cache is
reported as peak - (RSS after setup + the handed-off copy of the state), which should
depend on the chunk size, not on the context length. Each length runs in its own process
(VmHWM is per process).

With `--prefill-workers W` (> 1) the prefill instance has W expert-parallel workers
(threads) and prefills the prompt context-parallel over them (each worker runs its part
of every chunk; on this machine each worker is one core).

Run from the repository root:  python benchmarks/long_context_bench.py [--preset long]
    [--tokens 65536,262144,1048576] [--chunk 2048] [--decode 16] [--prefill-workers 2]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cluster.assembly.model_cache import ensure_preset_checkpoint  # noqa: E402
from cluster.backends.local import LocalWorkerGroup  # noqa: E402
from cluster.engine.engine import Engine, EngineConfig  # noqa: E402
from cluster.engine.pool_router import DisaggRouter  # noqa: E402
from cluster.engine.requests import GenerateRequest, RequestOutput  # noqa: E402
from encoding.tokenizer import load_tokenizer  # noqa: E402
from workers.kv_cache import KVCacheManager, KVLayout  # noqa: E402
from workers.model import Transformer  # noqa: E402
from workers.step import SamplingParams  # noqa: E402
from workers.weights import load_model  # noqa: E402
from workers.worker import ModelWorker  # noqa: E402

PAGE = 128  # raw tokens per KV page
MIB = 2**20


def proc_status_kib(field: str) -> int:
    """A `VmHWM`/`VmRSS`-style field of /proc/self/status, in KiB (0 where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def pool_bytes(model: Transformer) -> int:
    """Bytes of the model's KV pool tensors as allocated (slots' rings + pages' entries)."""
    seen: dict[int, int] = {}
    for layer in model.kv.layers:
        for t in [*layer.slot_tensors(), *(c.entries for c in (layer.compressor, layer.indexer) if c is not None)]:
            base = t._base if t._base is not None else t  # views of one shared tensor count once
            seen[id(base)] = base.numel() * base.element_size()
    return sum(seen.values())


class Trace:
    """Token arrival times of the request, the final output, and per-step timings."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self.tokens: list[int] = []
        self.final: RequestOutput | None = None
        self.done = threading.Event()

    def sink(self, out: RequestOutput) -> None:
        if out.token_ids:
            self.arrivals.append(time.perf_counter())
            self.tokens += list(out.token_ids)
        if out.finish_reason is not None:
            self.final = out
            self.done.set()


def _timed(obj, method: str, record: list[float]) -> None:
    """Wrap `obj.method` (an instance attribute) to append each call's seconds to `record`."""
    real = getattr(obj, method)

    def call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            record.append(time.perf_counter() - t0)

    setattr(obj, method, call)


def run_one(
    checkpoint: Path, tokens: int, chunk: int, decode: int, progress: bool = True, prefill_workers: int = 1
) -> dict:
    """One request of `tokens` prompt tokens through a prefill and a decode instance; the report as a dict."""
    total = tokens + 1 + decode  # prompt, the prefill's first token, the decoded ones
    group = None
    if prefill_workers > 1:
        group = LocalWorkerGroup.load(checkpoint, prefill_workers, dtype=torch.float32, page_size=PAGE)
        models = [w.model for w in group.workers] + [load_model(checkpoint, dtype=torch.float32, progress=False)]
    else:
        models = [load_model(checkpoint, dtype=torch.float32, progress=False) for _ in range(2)]
    cfg = models[0].cfg
    layout = KVLayout.for_model(cfg, elem_bytes=4)
    for m in models:  # the request's whole cache (a replica on every prefill worker), allocated now
        m.configure_kv(page_size=PAGE, slots=2, pages=math.ceil(total / PAGE) + 1)
    workers = [group or LocalWorkerGroup([ModelWorker(models[0])]), LocalWorkerGroup([ModelWorker(models[-1])])]
    pages = math.ceil(total / PAGE) + 64
    kv = [KVCacheManager(layout, num_pages=pages * prefill_workers, page_size=PAGE),
          KVCacheManager(layout, num_pages=pages, page_size=PAGE)]  # fmt: skip
    config = EngineConfig(max_batch_tokens=chunk, max_model_len=max(total, EngineConfig.max_model_len),
                          context_parallel_min_tokens=prefill_workers if prefill_workers > 1 else 0)  # fmt: skip
    tokenizer = load_tokenizer()
    prefill, dec = (Engine(w, tokenizer, k, config).start() for w, k in zip(workers, kv, strict=True))
    router = DisaggRouter([prefill], [dec])
    export_s: list[float] = []
    import_s: list[float] = []
    _timed(workers[0], "export", export_s)
    _timed(models[-1].kv, "import_", import_s)
    decode_steps: list[float] = []
    dec.stats.step_listeners.append(lambda seconds, n: decode_steps.append(seconds) if n else None)
    prompt = tuple(torch.randint(3, 120000, (tokens,), generator=torch.Generator().manual_seed(tokens)).tolist())
    setup_kib = proc_status_kib("VmRSS")
    trace = Trace()
    bar = tqdm(total=tokens, desc=f"prefill {tokens}", unit="tok", unit_scale=True, disable=not progress)
    prefill.stats.step_listeners.append(lambda seconds, n: bar.update(n))
    t0 = time.perf_counter()
    router.submit(GenerateRequest("long", prompt, SamplingParams(max_tokens=1 + decode, temperature=0.0,
                                                                 ignore_eos=True)), trace.sink)  # fmt: skip
    trace.done.wait()
    bar.close()
    router.stop()
    t_first = trace.arrivals[0] - t0
    steady = decode_steps[1:] or decode_steps  # the first decode step also imports the state
    return {
        "tokens": tokens,
        "chunk": chunk,
        "prefill_workers": prefill_workers,
        "context_parallel_chunks": group.cp.chunks if group else 0,
        "threads": torch.get_num_threads(),
        "finish_reason": trace.final.finish_reason if trace.final else None,
        "completion_tokens": len(trace.tokens),
        "prefill_s": t_first,
        "prefill_tok_s": tokens / t_first,
        "handoffs": router.handoffs,
        "handoff_bytes": router.handoff_bytes,
        "export_s": sum(export_s),
        "import_s": sum(import_s),
        "decode_ms": statistics.median(steady) * 1000 if steady else float("nan"),
        "decode_steps": len(decode_steps),
        "kv_bytes": layout.bytes_for(tokens),
        "kv_bytes_per_token": layout.bytes_per_token,
        "model_bytes": sum(tensor_bytes([*m.parameters(), *m.buffers()]) for m in models),
        "pool_bytes": sum(pool_bytes(m) for m in models),
        "setup_rss": setup_kib * 1024,
        "peak_rss": proc_status_kib("VmHWM") * 1024,
    }


def beyond_cache(r: dict) -> float:
    """What the forward passes needed beyond the setup (libraries, weights, both pools) and
    the handed-off copy of the state."""
    return r["peak_rss"] - r["setup_rss"] - r["handoff_bytes"]


def print_table(rows: list[dict], preset: str) -> None:
    r0 = rows[0]
    print(f"long-context bench: {preset}, torch {torch.__version__}, {r0['threads']} thread(s), float32, "
          f"prefill chunks of {r0['chunk']} over {r0['prefill_workers']} worker(s), {r0['decode_steps']} decode "
          f"steps; KV {r0['kv_bytes_per_token']:.0f} "
          f"B/token; weights {r0['model_bytes'] / MIB:.0f} MiB (both instances)")  # fmt: skip
    print("| prompt tokens | prefill | prefill tok/s | handoff | export + import | decode / token | KV (arithmetic) | "
          "pools reserved | RSS after setup | peak RSS | peak beyond setup + handoff copy |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['prefill_s']:.1f} s | {r['prefill_tok_s']:.0f} | "
              f"{r['handoff_bytes'] / MIB:.1f} MiB | {(r['export_s'] + r['import_s']) * 1000:.0f} ms | "
              f"{r['decode_ms']:.1f} ms | {r['kv_bytes'] / MIB:.1f} MiB | {r['pool_bytes'] / MIB:.1f} MiB | "
              f"{r['setup_rss'] / MIB:.0f} MiB | {r['peak_rss'] / MIB:.0f} MiB | "
              f"{beyond_cache(r) / MIB:.0f} MiB |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="long", help="model preset (default long)")
    ap.add_argument("--tokens", default="1048576", help="comma-separated prompt lengths, run small to large, "
                    "each in its own process (default 1048576)")  # fmt: skip
    ap.add_argument("--chunk", type=int, default=2048, help="prefill tokens per engine step (default 2048)")
    ap.add_argument("--decode", type=int, default=16, help="tokens decoded on the decode instance (default 16)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--prefill-workers", type=int, default=1,
                    help="workers of the prefill instance; > 1: context-parallel prefill over them (default 1)")
    ap.add_argument("--one", action="store_true", help="run the first length here and print its report as JSON")
    args = ap.parse_args()
    lengths = sorted(int(x) for x in args.tokens.split(","))
    torch.set_num_threads(args.threads)
    checkpoint = ensure_preset_checkpoint(args.preset)
    if args.one:
        print(json.dumps(run_one(checkpoint, lengths[0], args.chunk, args.decode,
                                 prefill_workers=args.prefill_workers)), flush=True)  # fmt: skip
        return
    rows = []
    for n in lengths:
        cmd = [sys.executable, __file__, "--one", "--preset", args.preset, "--tokens", str(n), "--chunk",
               str(args.chunk), "--decode", str(args.decode), "--threads", str(args.threads),
               "--prefill-workers", str(args.prefill_workers)]  # fmt: skip
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # partial results survive a later failure
    print_table(rows, args.preset)


if __name__ == "__main__":
    main()
