"""KV handoff cost: bytes and time to move a prefilled request's V4 state to a decode
instance, next to the time of the prefill itself, per prompt length.

The state is V4's compressed cache: per layer the window ring and compressor rings (fixed)
plus one entry per 4 tokens on CSA layers (and an indexer key) and one per 128 on HCA
layers, so it grows with the context at `bytes_per_token` (about 1/10 of an MLA cache per
token for V4-Flash). The table checks the measured bytes against that arithmetic.

Run from the repository root:  python benchmarks/handoff_bench.py [--preset tiny] [--lengths 512,2048,8192]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cluster.model_cache import ensure_preset_checkpoint  # noqa: E402
from workers.kv_cache import KVLayout  # noqa: E402
from workers.model import Batch  # noqa: E402
from workers.weights import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    ap.add_argument("--lengths", default="512,2048,8192", help="prompt lengths (default 512,2048,8192)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = ensure_preset_checkpoint(args.preset)
    src = load_model(checkpoint, dtype=torch.float32, progress=False)
    dst = load_model(checkpoint, dtype=torch.float32, progress=False)
    layout = KVLayout.for_model(src.cfg, elem_bytes=4)
    rows = []
    for n in tqdm([int(x) for x in args.lengths.split(",")], desc="handoff bench", unit="prompt"):
        ids = torch.randint(3, 120000, (n,), generator=torch.Generator().manual_seed(n))
        st = src.new_state()
        t0 = time.perf_counter()
        for c in range(0, n, 512):  # chunked prefill, as the engine runs it
            src(Batch.build([ids[c : c + 512]], [st]), [st])
        t1 = time.perf_counter()
        exp = src.kv.export(st)
        t2 = time.perf_counter()
        moved = dst.kv.import_(exp)
        t3 = time.perf_counter()
        rows.append((n, t1 - t0, exp.nbytes(), layout.bytes_for(n), t2 - t1, t3 - t2))
        st.free()
        moved.free()
    print(f"handoff bench: {args.preset}, torch {torch.__version__}, {args.threads} thread(s), float32 state")
    print("| prompt tokens | prefill | state bytes | arithmetic | export | import | handoff / prefill |")
    print("|---|---|---|---|---|---|---|")
    for n, pre, nbytes, arith, exp_s, imp_s in rows:
        print(f"| {n} | {pre * 1000:.0f} ms | {nbytes / 2**20:.2f} MiB | {arith / 2**20:.2f} MiB | "
              f"{exp_s * 1000:.1f} ms | {imp_s * 1000:.1f} ms | {(exp_s + imp_s) / pre:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
