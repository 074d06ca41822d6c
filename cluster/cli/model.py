"""`dsv4 init-model` and `dsv4 logits`: make a random checkpoint, and score token ids with it."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from workers.presets import PRESETS

if TYPE_CHECKING:  # heavy imports stay inside the commands, so `dsv4 chat` starts fast
    import torch

log = logging.getLogger("dsv4")

DTYPES = ("float32", "bfloat16")


class UsageError(ValueError):
    """Bad command-line input; the CLI prints it and exits with status 2."""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init-model",
        help="write a random checkpoint in the official DeepSeek-V4 layout",
        description="Write config.json + safetensors shards + index with random, well-scaled weights.",
    )
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape (default: tiny)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quant", default="none", choices=["none", "fp8", "fp8-fp4"],
                   help="weight format: bf16 (none), FP8 e4m3 block-scaled, or FP8 + FP4 routed experts")
    p.set_defaults(func=init_model_main)

    p = sub.add_parser(
        "logits",
        help="compute logits for token ids (a user-facing correctness check)",
        description="Score every position of each sequence in IDS.json; writes logits.<i> [S_i, vocab] float32.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--input", required=True, help='JSON file {"input_ids": [[...], ...]}')
    p.add_argument("--output", required=True, help="output .safetensors file")
    p.add_argument("--mode", default="full", choices=["full", "incremental", "chunked"],
                   help="one pass, one token per step, or --chunk tokens per step (default: full)")
    p.add_argument("--chunk", type=int, default=64, help="chunk size for --mode chunked (default: 64)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (default: float32)")
    p.add_argument("--no-simulate-quant", action="store_true",
                   help="turn off the FP8/FP4 KV and indexer rounding of the official code")
    p.set_defaults(func=logits_main)


def init_model_main(args: argparse.Namespace) -> None:
    from workers.checkpoint import save_checkpoint
    from workers.presets import preset_config
    from workers.weights import random_weights

    cfg = preset_config(args.preset)
    out = Path(args.out)
    log.info("init-model: preset %s, seed %d, quant %s -> %s", args.preset, args.seed, args.quant, out)
    t0 = time.perf_counter()
    tensors = random_weights(cfg, args.seed)
    save_checkpoint(out, cfg.to_dict(), tensors, quant=args.quant)
    n_params = sum(t.numel() for t in tensors.values())
    log.info("wrote %.1fM parameters in %.1fs", n_params / 1e6, time.perf_counter() - t0)


def read_input_ids(path: str, vocab_size: int) -> list[torch.Tensor]:
    """Parse and validate IDS.json; errors name the sequence and the position."""
    import torch

    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise UsageError(f"--input {path}: no such file") from e
    except json.JSONDecodeError as e:
        raise UsageError(f"--input {path}: not valid JSON ({e})") from e
    seqs = raw.get("input_ids") if isinstance(raw, dict) else None
    if not isinstance(seqs, list) or not seqs:
        raise UsageError(f'--input {path}: expected {{"input_ids": [[id, ...], ...]}} with at least one sequence')
    out = []
    for i, seq in enumerate(seqs):
        if not isinstance(seq, list) or not seq:
            raise UsageError(f"--input {path}: input_ids[{i}] must be a non-empty list of token ids")
        for j, tok in enumerate(seq):
            if not isinstance(tok, int) or isinstance(tok, bool) or not 0 <= tok < vocab_size:
                raise UsageError(
                    f"--input {path}: input_ids[{i}][{j}] = {tok!r} is not a token id in [0, {vocab_size})"
                )
        out.append(torch.tensor(seq, dtype=torch.int64))
    return out


def logits_main(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    from cluster.assembly.build import compute_dtype
    from workers.score import score
    from workers.weights import load_model

    if args.mode == "chunked" and args.chunk < 1:
        raise UsageError(f"--chunk must be >= 1, got {args.chunk}")
    model = load_model(args.checkpoint, dtype=compute_dtype(args.dtype), simulate_quant=not args.no_simulate_quant)
    seqs = read_input_ids(args.input, model.cfg.vocab_size)
    step = {"full": None, "incremental": 1, "chunked": args.chunk}[args.mode]
    t0 = time.perf_counter()
    logits = score(model, seqs, step)
    n_tok = sum(s.shape[0] for s in seqs)
    log.info("logits: %d sequences, %d tokens, mode %s, %.2fs", len(seqs), n_tok, args.mode, time.perf_counter() - t0)
    save_file({f"logits.{i}": t.contiguous() for i, t in enumerate(logits)}, args.output)
    log.info("wrote %s", args.output)
