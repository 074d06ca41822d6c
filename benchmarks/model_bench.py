"""Prefill throughput and decode latency of our DeepSeek-V4 model against HF transformers' DeepseekV4ForCausalLM.

Both sides load the same random checkpoint (made once per preset under --workdir and reused)
and do the same math: ours runs with `simulate_quant=False` (HF has no FP8/FP4 rounding).
The two sides run in lockstep (our prefill, HF's prefill, our decode step, HF's decode step,
...; which side goes first alternates per repeat) so that they share the machine's noise;
each number is the median over --repeats (a best-of table follows).

  prefill  one forward over --prompt-len random ids, logits of the last position only
  decode   then --decode-tokens forwards of one (fixed, random) token each against the
           prefill's state / KV cache, logits of that token; median ms per token

Meant for a shared CPU machine: compare the ratios, not the absolute numbers.

Example:
  python benchmarks/model_bench.py --presets tiny --prompt-len 256 --decode-tokens 16 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import busy_warning, machine_info  # noqa: E402
from workers.checkpoint import CONFIG_FILE, INDEX_FILE, save_checkpoint  # noqa: E402
from workers.model import Batch, Transformer  # noqa: E402
from workers.presets import PRESETS, preset_config  # noqa: E402
from workers.weights import load_model, random_weights  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
SEED = 0  # checkpoint weights
IDS_SEED = 1234  # prompt and decode ids


# -- command line --------------------------------------------------------------------------


def parse_prompt_len(text: str) -> dict[str, int]:
    """'512' or '512,small=256': a default length and per-preset overrides ('*' is the default)."""
    out: dict[str, int] = {}
    for item in text.split(","):
        name, _, value = item.strip().rpartition("=")
        try:
            n = int(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"bad --prompt-len item {item!r}: expected N or PRESET=N") from e
        if n < 1:
            raise argparse.ArgumentTypeError(f"bad --prompt-len item {item!r}: length must be >= 1")
        out[name.strip() or "*"] = n
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="model_bench.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--presets",
        default="tiny,small",
        help=f"comma-separated model presets (known: {', '.join(PRESETS)}; default: tiny,small)",
    )
    p.add_argument(
        "--dtype", default="bfloat16", choices=sorted(DTYPES), help="compute dtype of both models (default: bfloat16)"
    )
    p.add_argument(
        "--prompt-len",
        default="512",
        type=parse_prompt_len,
        metavar="N[,PRESET=N...]",
        help="prefill length in tokens; per-preset overrides like '512,small=256' (default: 512)",
    )
    p.add_argument("--decode-tokens", type=int, default=32, help="decode steps after each prefill (default: 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per side; medians are reported (default: 3)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    p.add_argument(
        "--workdir",
        default=str(Path("~/.cache/dsv4/bench").expanduser()),
        help="where checkpoints are created and reused (default: ~/.cache/dsv4/bench)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the float32 check that both models pick the same greedy token after prefill",
    )
    p.add_argument("--json", metavar="OUT", help="also write the results (with every raw timing) to this file")
    args = p.parse_args(argv)
    args.presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    for name in args.presets:
        if name not in PRESETS:
            p.error(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    for name in args.prompt_len:
        if name != "*" and name not in PRESETS:
            p.error(f"--prompt-len names unknown preset {name!r}")
    if args.decode_tokens < 1 or args.repeats < 1 or args.threads < 1:
        p.error("--decode-tokens, --repeats and --threads must be >= 1")
    return args


# -- setup --------------------------------------------------------------------------------


def ensure_checkpoint(workdir: Path, preset: str) -> Path:
    """The preset's random bf16 checkpoint under workdir, written on first use."""
    path = workdir / f"{preset}-seed{SEED}"
    if (path / CONFIG_FILE).exists() and (path / INDEX_FILE).exists():
        return path
    print(f"[{preset}] writing checkpoint to {path} ...", flush=True)
    cfg = preset_config(preset)
    tmp = path.with_name(path.name + ".tmp")
    save_checkpoint(tmp, cfg.to_dict(), random_weights(cfg, SEED), quant="none")
    tmp.rename(path)  # config.json and index appear only once everything is written
    return path


def load_both(path: Path, dtype: torch.dtype) -> tuple[Transformer, Any]:
    import transformers

    ours = load_model(path, dtype=dtype, simulate_quant=False, progress=False)
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return ours, hf


# -- the two sides, one forward at a time --------------------------------------------------


@dataclass
class Run:
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)  # one per decode token
    next_token: int = -1  # greedy token after the prefill


def steps_ours(model: Transformer, prompt: torch.Tensor, steps: torch.Tensor, run: Run) -> Iterator[None]:
    """Prefill, then one decode step per token; yields after each forward (timings go into `run`)."""
    st = model.new_state()
    t0 = time.perf_counter()
    streams = model(Batch.build([prompt], [st]), [st])
    logits = model.logits(streams[-1:])
    run.prefill_s = time.perf_counter() - t0
    run.next_token = int(logits[-1].argmax())
    yield
    for tok in steps:
        t0 = time.perf_counter()
        streams = model(Batch.build([tok.view(1)], [st]), [st])
        model.logits(streams[-1:])
        run.decode_s.append(time.perf_counter() - t0)
        yield


def steps_hf(hf: Any, prompt: torch.Tensor, steps: torch.Tensor, run: Run) -> Iterator[None]:
    t0 = time.perf_counter()
    out = hf(prompt[None], use_cache=True, logits_to_keep=1)
    run.prefill_s = time.perf_counter() - t0
    run.next_token = int(out.logits[0, -1].argmax())
    cache = out.past_key_values
    yield
    for tok in steps:
        t0 = time.perf_counter()
        out = hf(tok.view(1, 1), past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        run.decode_s.append(time.perf_counter() - t0)
        yield


def run_lockstep(ours: Transformer, hf: Any, prompt: torch.Tensor, steps: torch.Tensor, first: str,
                 tick=lambda: None) -> dict[str, Run]:  # fmt: skip
    """One repeat of both sides in lockstep (prefill, prefill, step, step, ...), `first` going first
    at every step, so that a burst of other work on the machine hits both sides alike."""
    runs = {"ours": Run(), "hf": Run()}
    gens = {"ours": steps_ours(ours, prompt, steps, runs["ours"]), "hf": steps_hf(hf, prompt, steps, runs["hf"])}
    order = [first, "hf" if first == "ours" else "ours"]
    gc.collect()
    for _ in range(1 + steps.shape[0]):
        for side in order:
            next(gens[side])
            tick()
    return runs


# -- per preset ---------------------------------------------------------------------------


@dataclass
class Result:
    preset: str
    prompt_len: int
    decode_tokens: int
    ours_prefill_tok_s: float
    hf_prefill_tok_s: float
    ours_decode_ms: float
    hf_decode_ms: float
    same_token_run_dtype: bool  # greedy token after prefill agrees in the benchmark dtype
    same_token_fp32: bool | None  # ... in float32 (None: check skipped)
    fp32_rel_err: float | None  # |ours - hf| / |hf| of the last-position logits in float32
    hf_attn_impl: str
    load_s: float
    best: dict[str, float] = field(default_factory=dict)  # the same four numbers, best repeat of each side
    # Paired: median of the ratios of neighbours in time (ours/HF per repeat's prefill, HF/ours per decode step).
    paired_prefill_ratio: float = 0.0
    paired_decode_speedup: float = 0.0
    raw: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def prefill_ratio(self) -> float:
        return self.ours_prefill_tok_s / self.hf_prefill_tok_s

    @property
    def decode_speedup(self) -> float:
        return self.hf_decode_ms / self.ours_decode_ms


def make_ids(vocab: int, prompt_len: int, decode_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(IDS_SEED)
    ids = torch.randint(0, vocab, (prompt_len + decode_tokens,), generator=gen)
    return ids[:prompt_len], ids[prompt_len:]


def check_fp32(path: Path, prompt: torch.Tensor, models: tuple[Transformer, Any] | None) -> tuple[bool, float]:
    """Greedy next token after the prefill, ours vs HF, in float32 (loads fp32 copies unless given)."""
    ours, hf = models if models is not None else load_both(path, torch.float32)
    st = ours.new_state()
    a = ours.logits(ours(Batch.build([prompt], [st]), [st])[-1:])[-1]
    b = hf(prompt[None], use_cache=False, logits_to_keep=1).logits[0, -1].float()
    rel = ((a - b).norm() / b.norm()).item()
    return int(a.argmax()) == int(b.argmax()), rel


def bench_preset(preset: str, args: argparse.Namespace) -> Result:
    dtype = DTYPES[args.dtype]
    prompt_len = args.prompt_len.get(preset, args.prompt_len.get("*", 512))
    path = ensure_checkpoint(Path(args.workdir).expanduser(), preset)
    t0 = time.perf_counter()
    ours, hf = load_both(path, dtype)
    load_s = time.perf_counter() - t0
    prompt, steps = make_ids(ours.cfg.vocab_size, prompt_len, args.decode_tokens)

    same_fp32 = rel = None
    if not args.no_check:
        print(f"[{preset}] float32 greedy check over {prompt_len} tokens ...", flush=True)
        same_fp32, rel = check_fp32(path, prompt, (ours, hf) if dtype == torch.float32 else None)
        gc.collect()
        if not same_fp32:
            print(
                f"WARNING [{preset}]: in float32 ours and HF pick different greedy tokens after the prefill "
                f"(relative logits error {rel:.2e})",
                flush=True,
            )

    # Warm-up (not timed): allocator, oneDNN primitives, first-call paths of both sides.
    run_lockstep(ours, hf, prompt[: min(prompt_len, 64)], steps[:2], "ours")

    runs: dict[str, list[Run]] = {"ours": [], "hf": []}
    total = args.repeats * 2 * (1 + args.decode_tokens)
    with tqdm(total=total, desc=f"{preset} (prompt {prompt_len})", unit="fwd", leave=False) as bar:
        for r in range(args.repeats):
            first = "ours" if r % 2 == 0 else "hf"
            bar.set_postfix_str(f"repeat {r + 1}/{args.repeats}, {first} first")
            for side, run in run_lockstep(ours, hf, prompt, steps, first, bar.update).items():
                runs[side].append(run)

    def prefill_tok_s(side: str, agg=statistics.median) -> float:
        return prompt_len / agg(x.prefill_s for x in runs[side])

    def decode_ms(side: str, agg=statistics.median) -> float:  # over repeats, of each repeat's median step
        return 1e3 * agg(statistics.median(x.decode_s) for x in runs[side])

    same_run = runs["ours"][0].next_token == runs["hf"][0].next_token
    result = Result(
        preset=preset, prompt_len=prompt_len, decode_tokens=args.decode_tokens,
        ours_prefill_tok_s=prefill_tok_s("ours"), hf_prefill_tok_s=prefill_tok_s("hf"),
        ours_decode_ms=decode_ms("ours"), hf_decode_ms=decode_ms("hf"),
        same_token_run_dtype=same_run, same_token_fp32=same_fp32, fp32_rel_err=rel,
        hf_attn_impl=str(getattr(hf.config, "_attn_implementation", "?")), load_s=load_s,
        best={"ours_prefill_tok_s": prefill_tok_s("ours", min), "hf_prefill_tok_s": prefill_tok_s("hf", min),
              "ours_decode_ms": decode_ms("ours", min), "hf_decode_ms": decode_ms("hf", min)},
        paired_prefill_ratio=statistics.median(
            h.prefill_s / o.prefill_s for o, h in zip(runs["ours"], runs["hf"], strict=True)),
        paired_decode_speedup=statistics.median(
            hs / os_ for o, h in zip(runs["ours"], runs["hf"], strict=True)
            for os_, hs in zip(o.decode_s, h.decode_s, strict=True)),
        raw={side: [asdict(x) for x in rs] for side, rs in runs.items()},
    )  # fmt: skip
    return result


# -- report -------------------------------------------------------------------------------


def _table(results: list[Result], numbers: list[dict[str, float]]) -> list[str]:
    head = ["preset", "prompt", "ours prefill tok/s", "HF prefill tok/s", "ratio ours/HF",
            "ours decode ms/tok", "HF decode ms/tok", "speedup HF/ours"]  # fmt: skip
    rows = [
        [r.preset, str(r.prompt_len), f"{n['ours_prefill_tok_s']:.1f}", f"{n['hf_prefill_tok_s']:.1f}",
         f"{n['ours_prefill_tok_s'] / n['hf_prefill_tok_s']:.2f}x", f"{n['ours_decode_ms']:.2f}",
         f"{n['hf_decode_ms']:.2f}", f"{n['hf_decode_ms'] / n['ours_decode_ms']:.2f}x"]
        for r, n in zip(results, numbers, strict=True)
    ]  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)), "  ".join("-" * w for w in widths)]
    return lines + ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]


def format_table(results: list[Result], info: dict[str, Any]) -> str:
    keys = ("ours_prefill_tok_s", "hf_prefill_tok_s", "ours_decode_ms", "hf_decode_ms")
    medians = [{k: getattr(r, k) for k in keys} for r in results]
    lines = [
        f"torch {info['torch']}, transformers {info['transformers']}, {info['cpu']} ({info['cpu_count']} cores), "
        f"threads {info['threads']}, dtype {info['dtype']}, commit {info['commit']}, "
        f"load avg {info['loadavg_start']:.1f} -> {info['loadavg_end']:.1f}",
        f"median of {info['repeats']} repeats ({info['decode_tokens']} decode tokens each):",
        *_table(results, medians),
        "",
        f"best of {info['repeats']} repeats (least disturbed by other work on the machine):",
        *_table(results, [r.best for r in results]),
        "",
    ]
    for r in results:
        check = (
            "skipped"
            if r.same_token_fp32 is None
            else (f"{'same' if r.same_token_fp32 else 'DIFFERENT'} greedy token (logits rel err {r.fp32_rel_err:.1e})")
        )
        lines.append(
            f"{r.preset}: paired ratios (median over neighbouring forwards): prefill ours/HF "
            f"{r.paired_prefill_ratio:.2f}x, decode speedup HF/ours {r.paired_decode_speedup:.2f}x"
        )
        lines.append(f"{r.preset}: float32 check {check}; {info['dtype']} greedy token "
                     f"{'same' if r.same_token_run_dtype else 'differs'}; HF attention {r.hf_attn_impl}; "
                     f"load {r.load_s:.1f}s")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()  # HF drops the mtp.* weights, and says so per tensor
    transformers.utils.logging.disable_progress_bar()
    info = machine_info(args)
    results = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for preset in args.presets:
            t1 = time.perf_counter()
            results.append(bench_preset(preset, args))
            print(f"[{preset}] done in {time.perf_counter() - t1:.0f}s", flush=True)
    info["loadavg_end"] = os.getloadavg()[0]
    print()
    print(format_table(results, info))
    for note in {busy_warning(info["loadavg_start"], args.threads), busy_warning(info["loadavg_end"], args.threads)}:
        if note:
            print(note)
            break
    print(f"total {time.perf_counter() - t0:.0f}s")
    if args.json:
        out = {
            "machine": info,
            "results": [
                asdict(r) | {"prefill_ratio": r.prefill_ratio, "decode_speedup": r.decode_speedup} for r in results
            ],
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
