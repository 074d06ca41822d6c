"""Decode cost per token against context length (4K ... 1M), next to the arithmetic of
what a V4 decode step must read.

Per token and layer a V4 decode reads: the weights, the window ring, on CSA layers the
indexer's pass over every 4x key (N/4 x index_head_dim) and the top-k gathered entries,
on HCA layers every 128x entry (N/128 x head_dim). Nothing is proportional to the raw
context N except through those compressed counts, so the 1M/4K ratio stays small. The
states are built by real prefill at the first length and by the engine's own state import
(`KVPool.import_` of a synthetic state of that many tokens) beyond, which is what a KV
handoff does; decode then runs the real model on them.

Run from the repository root:  python benchmarks/context_bench.py [--preset tiny]
    [--contexts 4096,65536,262144,1048576] [--batch 1] [--steps 5]
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

from cluster.assembly.model_cache import ensure_preset_checkpoint  # noqa: E402
from workers.kv_pool import SeqExport  # noqa: E402
from workers.model import Batch, Transformer  # noqa: E402
from workers.weights import load_model  # noqa: E402


def synthetic_state(model: Transformer, n: int, gen: torch.Generator) -> SeqExport:
    """A state of `n` tokens shaped like a real one (rings and entries of the right sizes)."""
    slot, entries = [], []
    for layer in model.kv.layers:
        slot.append([torch.randn(t.shape[1:], generator=gen).to(t.dtype) for t in layer.slot_tensors()])
        comps = [c for c in (layer.compressor, layer.indexer) if c is not None]
        entries.append([torch.randn(n // c.ratio, c.width, generator=gen).to(c.dtype) for c in comps])
    return SeqExport(n, slot, entries)


def bytes_read(model: Transformer, n: int, elem: int) -> dict[str, float]:
    """What one decode token reads at context n, by kind (weights: every parameter a token touches)."""
    cfg = model.cfg
    active = 0
    for name, p in model.named_parameters():
        if ".experts." in name and ".shared" not in name:  # routed experts: only top-k of them
            p_bytes = p.numel() * p.element_size() * cfg.num_experts_per_tok / cfg.n_routed_experts
        elif name.startswith("mtp."):
            continue
        elif name == "embed.weight":  # a token reads its own row
            p_bytes = p.shape[1] * p.element_size()
        else:
            p_bytes = p.numel() * p.element_size()
        active += p_bytes
    window = topk = hca = indexer = 0.0
    for i in range(cfg.num_hidden_layers):
        r = cfg.compress_ratio(i)
        window += cfg.sliding_window * cfg.head_dim * elem
        if r == 4:
            indexer += n // 4 * cfg.index_head_dim * elem
            topk += min(cfg.index_topk, n // 4) * cfg.head_dim * elem
        elif r == 128:
            hca += n // 128 * cfg.head_dim * elem
    return {"weights": active, "window": window, "topk": topk, "hca": hca, "indexer": indexer}


def time_decode(model: Transformer, states: list, steps: int) -> float:
    """Seconds per decode step (one token for each state, logits included), after a warm-up step."""
    def step() -> None:
        model.logits(model(Batch.build([torch.tensor([7])] * len(states), states), states))

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    ap.add_argument("--contexts", default="4096,65536,262144,1048576", help="context lengths")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoding together (default 1)")
    ap.add_argument("--steps", type=int, default=5, help="decode steps timed per context (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(ensure_preset_checkpoint(args.preset), dtype=torch.float32, progress=False)
    elem = 4
    gen = torch.Generator().manual_seed(0)
    contexts = [int(x) for x in args.contexts.split(",")]
    rows = []
    for i, n in enumerate(tqdm(contexts, desc="context bench", unit="context")):
        if i == 0:  # real prefill, in 512-token chunks
            states = [model.new_state() for _ in range(args.batch)]
            ids = torch.randint(3, 120000, (n,), generator=gen)
            for st in states:
                for c in range(0, n, 512):
                    model(Batch.build([ids[c : c + 512]], [st]), [st])
        else:  # the engine's own state import
            states = [model.kv.import_(synthetic_state(model, n, gen)) for _ in range(args.batch)]
        per_step = time_decode(model, states, args.steps)
        rows.append((n, per_step, bytes_read(model, n, elem), "prefill" if i == 0 else "import"))
        for st in states:
            st.free()
    base_t, base_b = rows[0][1], sum(rows[0][2].values())
    print(f"context bench: {args.preset}, torch {torch.__version__}, {args.threads} thread(s), float32, "
          f"batch {args.batch}, {args.steps} steps")
    print("| context | state from | decode step | x vs first | bytes read / token (weights, window, top-k, "
          "HCA, indexer) | predicted x |")
    print("|---|---|---|---|---|---|")
    for n, t, b, how in rows:
        parts = ", ".join(f"{v / 2**20:.2f}" for v in b.values())
        print(f"| {n} | {how} | {t * 1000:.1f} ms | {t / base_t:.2f} | {sum(b.values()) / 2**20:.2f} MiB "
              f"({parts}) | {sum(b.values()) / base_b:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
