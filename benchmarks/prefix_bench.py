"""The prefix cache on an agent loop: time to first token per turn, with and without it.

Each turn's prompt is the whole conversation so far (previous prompt + its answer) plus a
new message of `--new` tokens; the engine answers `--out` greedy tokens. With the prefix
cache a turn resumes from the state kept by the previous turn, so its prefill covers the
new tokens only. Both engines run in the same process on the same checkpoint; the table
gives TTFT per turn, the cached tokens reported, and the ratio.

Run from the repository root:  python benchmarks/prefix_bench.py [--preset tiny] [--turns 8]
"""

from __future__ import annotations

import argparse
import sys
import threading
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


def run_turn(engine: Engine, uid: str, prompt: list[int], out: int) -> tuple[list[int], float, int]:
    """(answer, TTFT seconds, cached tokens) of one greedy request."""
    done, tokens, final = threading.Event(), [], []

    def sink(o: RequestOutput) -> None:
        tokens.extend(o.token_ids)
        if o.finish_reason is not None:
            final.append(o)
            done.set()

    engine.submit(GenerateRequest(uid, tuple(prompt), SamplingParams(max_tokens=out, temperature=0.0,
                                                                     ignore_eos=True)), sink)  # fmt: skip
    done.wait()
    return tokens, final[0].time_to_first_token_ms / 1000, final[0].cached_tokens


def agent_loop(engine: Engine, news: list[list[int]], out: int, bar: tqdm) -> list[tuple[int, float, int, list]]:
    history: list[int] = []
    rows = []
    for t, new in enumerate(news):
        prompt = history + new
        answer, ttft, cached = run_turn(engine, f"t{t}", prompt, out)
        rows.append((len(prompt), ttft, cached, answer))
        history = prompt + answer
        bar.update()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    ap.add_argument("--turns", type=int, default=8, help="turns of the agent loop (default 8)")
    ap.add_argument("--new", type=int, default=300, help="new tokens per turn (default 300)")
    ap.add_argument("--out", type=int, default=16, help="answer tokens per turn (default 16)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = ensure_preset_checkpoint(args.preset)
    model = load_model(checkpoint, dtype=torch.float32, progress=False)
    gen = torch.Generator().manual_seed(0)
    news = [torch.randint(3, 120000, (args.new,), generator=gen).tolist() for _ in range(args.turns)]
    results = {}
    with tqdm(total=2 * args.turns, desc="prefix bench", unit="turn") as bar:
        for cache in (False, True):
            kv = KVCacheManager(KVLayout.for_model(model.cfg, 4), num_pages=8192)
            engine = Engine(ModelWorker(model), load_tokenizer(), kv, EngineConfig(prefix_cache=cache)).start()
            results[cache] = agent_loop(engine, news, args.out, bar)
            engine.stop()
    same = all(a[3] == b[3] for a, b in zip(results[False], results[True], strict=True))
    print(f"prefix bench: {args.preset}, torch {torch.__version__}, {args.threads} thread(s), float32, "
          f"{args.new} new tokens + {args.out} answer tokens per turn; same tokens with and without: {same}")
    print("| turn | prompt tokens | cached | TTFT without | TTFT with | x |")
    print("|---|---|---|---|---|---|")
    for t, (off, on) in enumerate(zip(results[False], results[True], strict=True)):
        print(f"| {t} | {off[0]} | {on[2]} | {off[1] * 1000:.0f} ms | {on[1] * 1000:.0f} ms | {off[1] / on[1]:.2f} |")
    total_off, total_on = sum(r[1] for r in results[False]), sum(r[1] for r in results[True])
    print(f"total TTFT: {total_off:.2f} s without, {total_on:.2f} s with ({total_off / total_on:.2f}x)")


if __name__ == "__main__":
    main()
