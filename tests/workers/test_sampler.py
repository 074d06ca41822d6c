from __future__ import annotations

import pytest
import torch

from workers.sampler import SamplingBatch, argmax, filtered_logits, sample, uniform


def batch(n: int, t=1.0, p=1.0, k=0, m=0.0, seed=0, counter=0, lp=0) -> SamplingBatch:
    return SamplingBatch.build([(t, p, k, m, seed + i, counter, lp) for i in range(n)])


def test_uniform_is_deterministic_and_spread():
    draws = [uniform(7, c) for c in range(2000)]
    assert draws == [uniform(7, c) for c in range(2000)]
    assert all(0 <= u < 1 for u in draws)
    assert abs(sum(draws) / len(draws) - 0.5) < 0.03
    assert uniform(7, 0) != uniform(8, 0)


def test_greedy_and_degenerate_filters_pick_argmax():
    logits = torch.randn(6, 50)
    best = logits.argmax(-1)
    assert torch.equal(sample(logits, batch(6, t=0.0))[0], best)
    assert torch.equal(sample(logits, batch(6, k=1))[0], best)
    assert torch.equal(sample(logits, batch(6, p=1e-6))[0], best)
    assert torch.equal(sample(logits, batch(6, m=1.0))[0], best)


def test_filters_keep_the_right_sets():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    kept = lambda sb: torch.isfinite(filtered_logits(logits, sb))[0].tolist()  # noqa: E731
    assert kept(batch(1, k=2)) == [True, True, False, False, False]
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    assert kept(batch(1, p=0.7)) == [True, True, False, False, False]
    assert kept(batch(1, p=0.6)) == [True, False, False, False, False]
    floor = 0.1 * probs[0]
    assert kept(batch(1, m=0.1)) == (probs >= floor).tolist()


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    n = 4000
    sb = SamplingBatch.build([(0.8, 1.0, 0, 0.0, 1234, c, 0) for c in range(n)])
    tokens = sample(logits.expand(n, -1), sb)[0]
    freq = torch.bincount(tokens, minlength=4).float() / n
    expect = (logits / 0.8).softmax(-1)
    assert (freq - expect).abs().max() < 0.03


def test_rows_do_not_depend_on_the_batch():
    logits = torch.randn(5, 100)
    sb_all = SamplingBatch.build([(1.0, 0.9, 20, 0.01, 99 + i, 3, 0) for i in range(5)])
    together = sample(logits, sb_all)[0]
    for i in range(5):
        alone = sample(logits[i : i + 1], SamplingBatch.build([(1.0, 0.9, 20, 0.01, 99 + i, 3, 0)]))[0]
        assert alone.item() == together[i].item()


def test_logprobs_are_raw_log_softmax():
    logits = torch.randn(3, 30)
    tokens, chosen, (top_ids, top_vals) = sample(logits, batch(3, t=0.5, lp=4))
    logp = logits.log_softmax(-1)
    torch.testing.assert_close(chosen, logp.gather(1, tokens[:, None]).squeeze(1))
    torch.testing.assert_close(top_vals, logp.topk(4, -1).values)
    assert torch.equal(top_ids, logp.topk(4, -1).indices)


@pytest.mark.parametrize("vocab", [129280, 1024, 130, 128, 7])
def test_two_pass_argmax_is_torch_argmax_ties_and_nan_included(vocab):
    """The oracle is torch's own argmax: the first of tied maxima, NaN counted as the largest."""
    gen = torch.Generator().manual_seed(vocab)
    ties = torch.randint(-3, 4, (16, vocab), generator=gen).float()  # many equal maxima, across blocks
    ties[3] = float("-inf")
    ties[4, vocab // 2] = float("inf")
    ties[5, -1] = float("nan")
    ties[6, [vocab // 3, -1]] = float("nan")
    for logits in (ties, torch.randn(32, vocab, generator=gen), torch.randn(1, vocab, generator=gen)):
        assert torch.equal(argmax(logits), logits.argmax(-1))
    wide = torch.randn(4, 2 * vocab, generator=gen)[:, ::2]  # a strided view
    assert torch.equal(argmax(wide), wide.argmax(-1))
