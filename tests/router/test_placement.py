from __future__ import annotations

import pytest
import torch

from router.placement import ExpertPlacement


def test_primary_blocks_and_local_experts():
    p = ExpertPlacement(8, 4)
    assert p.experts_per_worker == 2
    assert [p.primary(e) for e in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [p.local_experts(r) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert p.owners(5) == [2]
    assert torch.equal(p.owner_counts, torch.ones(8, dtype=torch.int64))


def test_replicas_extend_owners_and_local_experts():
    p = ExpertPlacement(8, 4, {5: [0, 3], 1: [2]})
    assert p.owners(5) == [2, 0, 3] and p.owners(1) == [0, 2] and p.owners(4) == [2]
    assert p.local_experts(0) == [0, 1, 5]
    assert p.local_experts(2) == [1, 4, 5]
    assert p.local_experts(3) == [5, 6, 7]
    assert p.owner_table[5].tolist() == [2, 0, 3] and p.owner_table[4].tolist() == [2, -1, -1]
    assert p.owner_counts.tolist() == [1, 2, 1, 1, 1, 3, 1, 1]


def test_local_index_inverts_local_experts():
    p = ExpertPlacement(12, 3, {0: [1, 2], 11: [0]})
    for rank in range(3):
        held = p.local_experts(rank)
        row = p.local_index[rank]
        assert row[torch.tensor(held)].tolist() == list(range(len(held)))
        assert (row >= 0).sum().item() == len(held)


def test_replica_rule_is_documented_formula_and_spreads():
    p = ExpertPlacement(8, 4, {5: [0, 3]})
    experts = torch.full((9,), 5)
    tokens = torch.arange(9)
    for layer, src in [(0, 0), (2, 1), (7, 3)]:
        got = p.pick_owners(experts, tokens, layer, src)
        want = torch.tensor([[2, 0, 3][(t + layer + src) % 3] for t in range(9)])
        assert torch.equal(got, want)
        assert sorted(set(got.tolist())) == [0, 2, 3]  # every copy gets traffic
    assert torch.equal(p.pick_owners(experts, tokens, 2, 1), p.pick_owners(experts, tokens, 2, 1))
    # unreplicated experts always go to the primary
    assert p.pick_owners(torch.tensor([4, 7, 0]), torch.tensor([3, 1, 2]), 5, 2).tolist() == [2, 3, 0]


def test_indivisible_experts_name_both_numbers():
    with pytest.raises(ValueError, match=r"num_experts=10.*num_workers=4"):
        ExpertPlacement(10, 4)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 4), "positive"),
        ((8, 0), "positive"),
        ((8, 4, {8: [1]}), "expert ids are 0..7"),
        ((8, 4, {1: [4]}), "ranks are 0..3"),
        ((8, 4, {1: [0]}), "only once"),  # replica on the primary's rank
        ((8, 4, {1: [2, 2]}), "only once"),
    ],
)
def test_bad_placements_are_value_errors(args, match):
    with pytest.raises(ValueError, match=match):
        ExpertPlacement(*args)


def test_out_of_range_queries():
    p = ExpertPlacement(8, 2)
    with pytest.raises(ValueError, match="rank 2"):
        p.local_experts(2)
    with pytest.raises(ValueError, match="expert 8"):
        p.owners(8)


def test_placement_is_frozen_and_compares_by_value():
    p = ExpertPlacement(8, 2, {0: [1]})
    with pytest.raises(AttributeError):
        p.num_workers = 4  # type: ignore[misc]
    assert p == ExpertPlacement(8, 2, {0: (1,)})
    assert p != ExpertPlacement(8, 2)
    assert hash(p) == hash(ExpertPlacement(8, 2))
