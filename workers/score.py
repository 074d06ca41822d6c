"""Scoring token ids with a model in one of the modes `dsv4 logits` offers: the whole
sequence in one pass, a chunk of tokens per step, or one token per step (the decode path).
Every mode must give the same logits (the model's own consistency check)."""

from __future__ import annotations

import torch

from workers.model import Batch, Transformer


def score(model: Transformer, seqs: list[torch.Tensor], step: int | None) -> list[torch.Tensor]:
    """Logits [S_i, vocab] per sequence, feeding at most `step` tokens per sequence per call
    (None: everything in one call). All sequences run together in one flat batch."""
    states = [model.new_state() for _ in seqs]
    parts: list[list[torch.Tensor]] = [[] for _ in seqs]
    done = [0] * len(seqs)
    while any(d < s.shape[0] for d, s in zip(done, seqs, strict=True)):
        live = [i for i, s in enumerate(seqs) if done[i] < s.shape[0]]
        chunks = [seqs[i][done[i] : None if step is None else done[i] + step] for i in live]
        batch = Batch.build(chunks, [states[i] for i in live])
        logits = model.logits(model(batch, [states[i] for i in live]))
        for i, sq in zip(live, batch.seqs, strict=True):
            parts[i].append(logits[sq.start : sq.end])
            done[i] += sq.end - sq.start
    return [torch.cat(p) for p in parts]
