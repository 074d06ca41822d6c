"""Short requests keep decoding while a long prompt prefills (chunked prefill interleaved
with decode): inter-token latency of the short requests alone, and while a long prefill
runs, for a few per-step token budgets.

Every engine step runs the decodes first, then prefill chunks up to `max_batch_tokens`, so
a long prompt never stalls the others; the budget sets how much one step may add to their
inter-token latency (and how fast the long prompt goes).

Run from the repository root:  python benchmarks/interleave_bench.py [--preset tiny]
    [--long 8192] [--budgets 128,512]
"""

from __future__ import annotations

import argparse
import statistics
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
from cluster.engine.engine import Engine, EngineConfig  # noqa: E402
from cluster.engine.requests import GenerateRequest, RequestOutput  # noqa: E402
from encoding.tokenizer import load_tokenizer  # noqa: E402
from workers.kv_cache import KVCacheManager, KVLayout  # noqa: E402
from workers.step import SamplingParams  # noqa: E402
from workers.weights import load_model  # noqa: E402
from workers.worker import ModelWorker  # noqa: E402


class Timing:
    """Token arrival times per request, and when each request finished."""

    def __init__(self) -> None:
        self.arrivals: dict[str, list[float]] = {}
        self.done: dict[str, threading.Event] = {}

    def sink(self, uid: str):
        self.arrivals[uid], self.done[uid] = [], threading.Event()

        def push(out: RequestOutput) -> None:
            if out.token_ids:
                self.arrivals[uid].append(time.perf_counter())
            if out.finish_reason is not None:
                self.done[uid].set()

        return push

    def gaps(self, uids: list[str], start: float, end: float) -> list[float]:
        out = []
        for uid in uids:
            times = [t for t in self.arrivals[uid] if start <= t <= end]
            out += [b - a for a, b in zip(times, times[1:], strict=False)]
        return out


def run(engine: Engine, long_len: int | None, n_short: int, gen: torch.Generator) -> tuple[list[float], float]:
    """(ITL gaps of the short requests while the long prompt prefills, or during their
    whole run without one; seconds the long prompt took to its first token)."""
    timing = Timing()
    params = SamplingParams(max_tokens=100000, temperature=0.0, ignore_eos=True)
    shorts = [f"s{i}" for i in range(n_short)]
    for uid in shorts:
        engine.submit(GenerateRequest(uid, tuple(torch.randint(3, 120000, (16,), generator=gen).tolist()), params),
                      timing.sink(uid))  # fmt: skip
    while any(len(timing.arrivals[u]) < 3 for u in shorts):  # all decoding
        time.sleep(0.01)
    t0 = time.perf_counter()
    ttft = 0.0
    if long_len:
        ids = tuple(torch.randint(3, 120000, (long_len,), generator=gen).tolist())
        engine.submit(GenerateRequest("long", ids, SamplingParams(max_tokens=1, temperature=0.0)), timing.sink("long"))
        timing.done["long"].wait()
        ttft = time.perf_counter() - t0
    else:
        time.sleep(3.0)
    t1 = time.perf_counter()
    for uid in shorts:
        engine.abort(uid)
    engine.wait_idle(60)
    return timing.gaps(shorts, t0, t1), ttft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    ap.add_argument("--long", type=int, default=8192, help="tokens of the long prompt (default 8192)")
    ap.add_argument("--short", type=int, default=4, help="short requests decoding meanwhile (default 4)")
    ap.add_argument("--budgets", default="128,512", help="max_batch_tokens values to compare (default 128,512)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(ensure_preset_checkpoint(args.preset), dtype=torch.float32, progress=False)
    gen = torch.Generator().manual_seed(0)
    budgets = [int(b) for b in args.budgets.split(",")]
    rows = []
    with tqdm(total=1 + len(budgets), desc="interleave bench", unit="run") as bar:
        for budget in [budgets[-1], *budgets]:
            kv = KVCacheManager(KVLayout.for_model(model.cfg, 4), num_pages=8192)
            engine = Engine(ModelWorker(model), load_tokenizer(), kv, EngineConfig(max_batch_tokens=budget)).start()
            alone = len(rows) == 0
            gaps, ttft = run(engine, None if alone else args.long, args.short, gen)
            engine.stop()
            rows.append(("no long prompt" if alone else f"{args.long}-token prefill", budget, gaps, ttft))
            bar.update()
    print(f"interleave bench: {args.preset}, torch {torch.__version__}, {args.threads} thread(s), float32, "
          f"{args.short} short requests decoding")
    print("| meanwhile | max_batch_tokens | ITL p50 | ITL p99 | ITL max | long prompt TTFT |")
    print("|---|---|---|---|---|---|")
    for what, budget, gaps, ttft in rows:
        q = statistics.quantiles(gaps, n=100) if len(gaps) > 1 else [gaps[0]] * 99
        print(f"| {what} | {budget} | {statistics.median(gaps) * 1000:.0f} ms | {q[98] * 1000:.0f} ms | "
              f"{max(gaps) * 1000:.0f} ms | {f'{ttft:.1f} s' if ttft else '-'} |")  # fmt: skip


if __name__ == "__main__":
    main()
