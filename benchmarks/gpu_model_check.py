"""The whole model on a GPU, through the kernels (issue #7): the logits of prefill chunks
and batched decode steps against the CPU's pure-torch path on the same random tiny model,
then decode-step time with and without the kernels.

One prepared call for the lent GPU machine (no Ray needed):
    python benchmarks/gpu_model_check.py --out $OUT/gpu_model.json
On a CPU, `--device cpu` runs the same steps with the kernels' torch references (a check
of this script, not of the GPU).

The random checkpoint is stored as the FP4 release is (`--quant fp8-fp4`: FP8 linears and
FP4 experts, so `fp8_gemm` and `fp4_grouped_gemm` run too). Checks, each printed with its
numbers:
  1. fp32, kernel path (Triton on CUDA) vs fp32 CPU torch path: max |logit diff|, same argmax
     (on bf16 weights: equal up to summation order; on FP8/FP4 weights the activation
     rounding before each GEMM makes the model discontinuous: most argmaxes agree).
  2. fp32, torch path on the GPU vs the CPU: the model itself is device-clean.
  3. bf16 kernel path vs fp32: share of positions with the same argmax.
  4. (quantized checkpoints) fp32 kernel path with the FP8/FP4 weights resident
     (`load_model(..., resident_quant=True)`) vs the default model's kernel path: bit-identical;
     and the weight bytes each holds on the device after the run (the default model holds its
     dequantized weights plus the copies the kernel path re-quantized).
  5. The serving path as `build_engine` loads it on the device (`ModelWorker`, FP8/FP4 weights
     resident): chunked prefill of a greedy and a seeded request, the last chunk shipping each
     layer for a KV handoff, the state imported into a second worker, batched decode. Its
     tokens equal a third worker's on the same device that kept the requests (exact), and
     are compared with the same run on the CPU (share of equal tokens).
Then decode steps (batch B at a context of C tokens) with the kernel path vs the torch
path on the same device: ms per step and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from workers.checkpoint import QUANT_MODES, save_checkpoint  # noqa: E402
from workers.model import Batch, Transformer  # noqa: E402
from workers.presets import preset_config  # noqa: E402
from workers.step import SamplingParams, SeqWork, StepPlan  # noqa: E402
from workers.weights import load_model, random_weights, resident_weight_bytes  # noqa: E402
from workers.worker import ModelWorker  # noqa: E402

LENGTHS, SPLIT, DECODE = (300, 131), 200, 5  # crosses 4- and 128-token blocks; top-k drops most keys


def scenario(model: Transformer, kernel_path: bool | None) -> list[torch.Tensor]:
    """Prefill two sequences (the first in two chunks), then decode both: logits per call (CPU)."""
    model.set_kernel_path(kernel_path)
    model.configure_kv()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 129280, (n,), generator=gen) for n in LENGTHS]
    states = [model.new_state() for _ in prompts]
    out = [model.logits(model(Batch.build([prompts[0][:SPLIT], *prompts[1:]], states), states))]
    out.append(model.logits(model(Batch.build([prompts[0][SPLIT:]], states[:1]), states[:1])))
    for _ in range(DECODE):
        ids = [torch.randint(0, 129280, (1,), generator=gen) for _st in states]
        out.append(model.logits(model(Batch.build(ids, states), states)))
    for st in states:
        st.free()
    return [t.float().cpu() for t in out]


SERVING = {"greedy": SamplingParams(max_tokens=8, temperature=0.0),
           "seeded": SamplingParams(max_tokens=8, temperature=0.9, top_k=20, seed=3)}


def serving_tokens(ckpt: Path, dev: torch.device, handoff: bool) -> dict[str, list[int]]:
    """Two requests through ModelWorker steps on `dev`: prefill in two chunks, then 6 batched
    decode steps; with `handoff` the last chunk is exported layer by layer and the states
    continue on a second worker (a KV handoff inside the device)."""

    def worker() -> ModelWorker:
        return ModelWorker(load_model(ckpt, dtype=torch.float32, simulate_quant=True, progress=False,
                                      resident_quant=dev.type == "cuda", device=dev))  # fmt: skip

    first = worker()
    gen = torch.Generator().manual_seed(4)
    prompts = {uid: tuple(torch.randint(3, 129280, (n,), generator=gen).tolist())
               for uid, n in zip(SERVING, LENGTHS, strict=True)}  # fmt: skip
    cut = {u: len(p) // 2 for u, p in prompts.items()}  # 150 and 65: mid-block, and the second in one page
    first.execute(StepPlan(work=tuple(SeqWork(u, p[: cut[u]], 0, False) for u, p in prompts.items()),
                           sampling=SERVING))  # fmt: skip
    last = StepPlan(work=tuple(SeqWork(u, p[cut[u] :], cut[u], True) for u, p in prompts.items()),
                    exports=frozenset(prompts) if handoff else frozenset())  # fmt: skip
    tokens = {u: [t] for u, t in first.execute(last).tokens.items()}
    imports, second = {}, first
    if handoff:
        imports = {u: first.export(u) for u in prompts}
        second = worker()
    for step in range(6):
        plan = StepPlan(work=tuple(SeqWork(u, (tokens[u][-1],), len(p) + step, True) for u, p in prompts.items()),
                        sampling=SERVING if step == 0 and handoff else {},
                        num_generated={u: len(tokens[u]) for u in prompts}, imports=imports if step == 0 else {})
        result = second.execute(plan)
        if result.failed:
            raise RuntimeError(f"the handoff failed: {result.failed}")
        for u, t in result.tokens.items():
            tokens[u].append(t)
    return tokens


def compare(got: list[torch.Tensor], ref: list[torch.Tensor]) -> dict[str, float]:
    diff = max(float((g - r).abs().max()) for g, r in zip(got, ref, strict=True))
    same = torch.cat([(g.argmax(-1) == r.argmax(-1)).float() for g, r in zip(got, ref, strict=True)])
    finite = all(bool(torch.isfinite(g).all()) for g in got)
    return {"max_abs_diff": diff, "same_argmax": float(same.mean()), "finite": finite}


def decode_ms(model: Transformer, kernel_path: bool | None, batch: int, context: int, steps: int) -> float:
    """ms per decode step of `batch` sequences whose states hold `context` prompt tokens."""
    model.set_kernel_path(kernel_path)
    model.configure_kv()
    gen = torch.Generator().manual_seed(2)
    states = [model.new_state() for _ in range(batch)]
    for i in range(0, context, 4096):  # prefill every sequence in chunks, all in one batch
        n = min(4096, context - i)
        model(Batch.build([torch.randint(0, 129280, (n,), generator=gen) for _ in states], states), states)
    ids = [torch.randint(0, 129280, (1,), generator=gen) for _ in states]
    model.logits(model(Batch.build(ids, states), states))  # warm-up (kernels compile here)
    sync = torch.cuda.synchronize if model.embed.weight.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        model.logits(model(Batch.build(ids, states), states))
    sync()
    return (time.perf_counter() - t0) * 1000 / steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (Triton kernels), or cpu (the kernels' references)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--quant", default="fp8-fp4", choices=QUANT_MODES,
                    help="how the random checkpoint stores its weights (fp8-fp4: FP8 linears, FP4 experts)")
    ap.add_argument("--batch", type=int, default=32, help="decode timing: sequences per step")
    ap.add_argument("--context", type=int, default=4096, help="decode timing: prompt tokens per sequence")
    ap.add_argument("--steps", type=int, default=20, help="decode timing: timed steps")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here; use --device cpu to check the script")
    if dev.type == "cpu":
        os.environ["DSV4_KERNELS"] = "ref"
    results: dict[str, object] = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                                  "torch": torch.__version__, "preset": args.preset, "quant": args.quant}  # fmt: skip
    weight_bytes: dict[str, int] = {}
    for quant in dict.fromkeys(("none", args.quant)):
        ckpt = Path(tempfile.mkdtemp(prefix="dsv4-gpu-check-"))
        cfg = preset_config(args.preset)
        save_checkpoint(ckpt, cfg.to_dict(), random_weights(cfg, seed=0), quant=quant, progress=False)
        ref = scenario(load_model(ckpt, dtype=torch.float32, simulate_quant=True, progress=False), False)
        on_dev = load_model(ckpt, dtype=torch.float32, simulate_quant=True, progress=False).to(dev)
        fast = scenario(on_dev, True)
        results[f"{quant}: fp32 kernels vs cpu"] = compare(fast, ref)
        if quant != "none":
            packed = load_model(ckpt, dtype=torch.float32, simulate_quant=True, progress=False,
                                resident_quant=True).to(dev)  # fmt: skip
            results[f"{quant}: fp32 resident kernels vs kernels"] = compare(scenario(packed, True), fast)
            weight_bytes = {"default": resident_weight_bytes(on_dev), "resident": resident_weight_bytes(packed)}
            del packed
        results[f"{quant}: fp32 torch path on device vs cpu"] = compare(scenario(on_dev, False), ref)
        bf16 = load_model(ckpt, dtype=torch.bfloat16, simulate_quant=True, progress=False).to(dev)
        results[f"{quant}: bf16 kernels vs fp32 cpu"] = compare(scenario(bf16, True), ref)
        if quant == args.quant:  # the serving path, as build_engine loads it on the device
            moved = serving_tokens(ckpt, dev, handoff=True)
            kept = serving_tokens(ckpt, dev, handoff=False)
            cpu = serving_tokens(ckpt, torch.device("cpu"), handoff=False)
            same = [a == b for u in moved for a, b in zip(moved[u], cpu[u], strict=True)]
            results["serving"] = {"handoff_equals_kept": moved == kept, "same_tokens_as_cpu": sum(same) / len(same),
                                  "tokens": moved}  # fmt: skip
            print(f"serving path on {dev.type}: handed-off tokens equal kept {moved == kept}, "
                  f"same tokens as cpu {sum(same) / len(same):.3f}")  # fmt: skip
    for name, r in results.items():
        if isinstance(r, dict) and "max_abs_diff" in r:
            print(f"{name:44s} max |diff| {r['max_abs_diff']:.2e}  same argmax {r['same_argmax']:.3f}  "
                  f"finite {r['finite']}")  # fmt: skip
    if weight_bytes:
        print(f"weight bytes on the device, {args.quant}: default {weight_bytes['default'] / 2**20:.1f} MiB, "
              f"resident {weight_bytes['resident'] / 2**20:.1f} MiB")  # fmt: skip
        results["weight_bytes"] = weight_bytes
    timing = {}
    for model, label in ((on_dev, "fp32"), (bf16, "bf16")):
        fast = decode_ms(model, True, args.batch, args.context, args.steps)
        plain = decode_ms(model, False, args.batch, args.context, args.steps)
        timing[label] = {"kernels_ms": fast, "torch_ms": plain, "speedup": plain / fast}
        print(f"decode step {label}, batch {args.batch}, context {args.context}: kernels {fast:.2f} ms, "
              f"torch {plain:.2f} ms ({plain / fast:.2f}x)")  # fmt: skip
    results["decode"] = timing
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    # bf16 weights: the kernel path is the torch path up to summation order. FP8/FP4 weights:
    # activations are rounded to e4m3 before each GEMM, so a last-bit difference upstream can
    # flip a rounding and move a logit; most argmaxes still agree.
    strict, quantized = results["none: fp32 kernels vs cpu"], results[f"{args.quant}: fp32 kernels vs cpu"]
    ok = strict["same_argmax"] == 1.0 and strict["max_abs_diff"] < 1e-3 and strict["finite"]
    ok = ok and quantized["same_argmax"] >= 0.95 and quantized["finite"]
    ok = ok and results["serving"]["handoff_equals_kept"]
    if weight_bytes:  # resident FP8/FP4 weights: the same kernels on the same packed tensors
        resident = results[f"{args.quant}: fp32 resident kernels vs kernels"]
        ok = ok and resident["max_abs_diff"] == 0.0 and weight_bytes["resident"] < weight_bytes["default"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
