"""KV handoff cost: bytes and time to move a prefilled request's V4 state to a decode
worker, next to the time of the prefill itself, per prompt length and transport.

The state is V4's compressed cache: per layer the window ring and compressor rings (fixed)
plus one entry per 4 tokens on CSA layers (and an indexer key) and one per 128 on HCA
layers, so it grows with the context at `bytes_per_token` (about 1/10 of an MLA cache per
token for V4-Flash). The table checks the measured bytes against that arithmetic.

Transports (workers/handoff.py): `local`, two workers in this process (the ticket is the
state); `object_store` and `collective`, a prefill and a decode Ray actor of a local Ray
cluster (started here): the layers go through the object store, or the decode actor
pulls them over a gloo group of the two. The prefill's last chunk ships each layer as it
is computed (included in the prefill time); `export` is the driver's wait for the ticket;
`import` is the decode worker's fetch and copy into its pool (its first decode step less
the median of four plain decode steps).

Run from the repository root:  python benchmarks/handoff_bench.py [--preset tiny]
    [--lengths 512,2048,8192] [--transports local,object_store,collective]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cluster.assembly.model_cache import ensure_preset_checkpoint  # noqa: E402
from workers.kv_cache import KVLayout  # noqa: E402
from workers.step import SamplingParams, SeqWork, StepPlan  # noqa: E402
from workers.weights import load_model  # noqa: E402
from workers.worker import ModelWorker  # noqa: E402

GREEDY = SamplingParams(max_tokens=2, temperature=0.0)
CHUNK = 512


def measure(prefill, decode, uid: str, n: int) -> tuple[float, int, float, float]:
    """One request of n tokens through a prefill worker and a decode worker (anything with
    execute/export): (prefill s, state bytes, export s, import s)."""
    ids = tuple(torch.randint(3, 120000, (n,), generator=torch.Generator().manual_seed(n)).tolist())
    t0 = time.perf_counter()
    for c in range(0, n, CHUNK):
        last = c + CHUNK >= n
        result = prefill.execute(StepPlan(work=(SeqWork(uid, ids[c : c + CHUNK], c, last),),
                                          sampling={uid: GREEDY} if c == 0 else {},
                                          exports=frozenset({uid} if last else ())))  # fmt: skip
    t1 = time.perf_counter()
    ticket = prefill.export(uid)
    t2 = time.perf_counter()
    token = result.tokens[uid]
    steps = []
    for i in range(5):  # the first step imports the state, the others are plain decode steps
        plan = StepPlan(work=(SeqWork(uid, (token,), n + i, True),), sampling={uid: GREEDY} if i == 0 else {},
                        num_generated={uid: 1 + i}, imports={uid: ticket} if i == 0 else {})  # fmt: skip
        s0 = time.perf_counter()
        out = decode.execute(plan)
        steps.append(time.perf_counter() - s0)
        if out.failed:
            raise RuntimeError(f"{uid}: {out.failed[uid]}")
        token = out.tokens[uid]
    decode.execute(StepPlan(work=(), finished=(uid,)))
    return t1 - t0, ticket.nbytes(), t2 - t1, max(0.0, steps[0] - sorted(steps[1:])[len(steps) // 2 - 1])


def workers_for(transport: str, checkpoint: Path):
    """(prefill, decode, stop) for a transport."""
    if transport == "local":
        def worker() -> ModelWorker:
            return ModelWorker(load_model(checkpoint, dtype=torch.float32, progress=False))

        return worker(), worker(), lambda: None
    import ray

    from cluster.backends.ray_group import RayWorkerGroup

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private cluster on this machine
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    groups = [RayWorkerGroup(checkpoint, 1, dtype="float32", num_cpus=1, transport=transport) for _ in range(2)]
    return groups[0], groups[1], lambda: [g.stop() for g in groups]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    ap.add_argument("--lengths", default="512,2048,8192", help="prompt lengths (default 512,2048,8192)")
    ap.add_argument("--transports", default="local,object_store,collective",
                    help="local, object_store, collective (the last two start a local Ray cluster)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="torch threads in this process (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = ensure_preset_checkpoint(args.preset)
    layout = KVLayout.for_model(load_model(checkpoint, dtype=torch.float32, progress=False).cfg, elem_bytes=4)
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for transport in args.transports.split(","):
        prefill, decode, stop = workers_for(transport, checkpoint)
        try:
            for n in tqdm(lengths, desc=f"handoff bench ({transport})", unit="prompt"):
                rows.append((transport, n, *measure(prefill, decode, f"{transport}-{n}", n)))
        finally:
            stop()
    print(f"handoff bench: {args.preset}, torch {torch.__version__}, float32 state, prefill chunks of {CHUNK}")
    print("| transport | prompt tokens | prefill | state bytes | arithmetic | export | import | handoff / prefill |")
    print("|---|---|---|---|---|---|---|---|")
    for transport, n, pre, nbytes, exp_s, imp_s in rows:
        print(f"| {transport} | {n} | {pre * 1000:.0f} ms | {nbytes / 2**20:.2f} MiB | "
              f"{layout.bytes_for(n) / 2**20:.2f} MiB | {exp_s * 1000:.1f} ms | {imp_s * 1000:.1f} ms | "
              f"{(exp_s + imp_s) / pre:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
