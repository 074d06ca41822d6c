"""A decode step asks the device nothing between its input copy and its sampled tokens.

Oracle: torch.profiler's count of the ops that make the host wait for a value
(`_local_scalar_dense`: item / bool / int of a tensor; `nonzero`), the count
`dsv4 bench decode` reports. The step is built to take every data-dependent branch the
forward has: blocks of both compress ratios closing for some rows and not others, rows
too short for any entry, indexer top-k over rows that see different numbers of keys, and
greedy rows beside sampled ones with top-k, top-p and min-p.
"""

from __future__ import annotations

import pytest
import torch

from cluster.bench.decode import profile_step
from workers.step import SamplingParams, SeqWork, StepPlan
from workers.weights import load_model
from workers.worker import ModelWorker

# next positions: 127 closes a 128-block (and a 4-block), 3 closes block 0 of ratio 4,
# 5 closes nothing, 1 has no entry yet, 200 sees 50 indexer keys
PROMPT_LENS = (127, 3, 5, 1, 200)
SAMPLING = (
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8, top_k=5, seed=1),
    SamplingParams(temperature=1.0, top_p=0.9, seed=2),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.7, min_p=0.05, seed=3),
)


@pytest.fixture(scope="module")
def worker(tiny_checkpoint):
    return ModelWorker(load_model(tiny_checkpoint, dtype=torch.float32, progress=False))


def test_a_decode_step_asks_the_device_nothing(worker):
    ratios = {worker.model.cfg.compress_ratio(i) for i in range(worker.model.cfg.num_hidden_layers)}
    assert {4, 128} <= ratios, "the tiny preset has CSA and HCA layers"
    uids = [f"s{i}" for i in range(len(PROMPT_LENS))]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, worker.model.cfg.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    prefill = StepPlan(tuple(SeqWork(u, tuple(p), 0, True) for u, p in zip(uids, prompts, strict=True)),
                       sampling=dict(zip(uids, SAMPLING, strict=True)))  # fmt: skip
    tokens = dict(worker.execute(prefill).tokens)
    plan = StepPlan(tuple(SeqWork(u, (tokens[u],), n, True) for u, n in zip(uids, PROMPT_LENS, strict=True)),
                    num_generated=dict.fromkeys(uids, 1))  # fmt: skip
    got = {}
    _, syncs = profile_step(lambda: got.update(worker.execute(plan).tokens))
    assert sorted(got) == sorted(uids)
    assert syncs == 0
    for uid in uids:
        worker.release(uid)
