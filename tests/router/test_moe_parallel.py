"""The real tiny model's MoE layer split over W workers equals the whole layer (docs/model.md §6)."""

from __future__ import annotations

import pytest

from router.comm import run_local
from tests.router.support import check_parallel_moe


@pytest.mark.parametrize(
    ("world_size", "replicas", "tokens"),
    [
        (1, {}, [9]),
        (2, {}, [7, 0]),
        (4, {}, [5, 0, 11, 3]),
        (4, {0: [3], 5: [0, 1], 7: [2]}, [0, 8, 6, 13]),
    ],
)
@pytest.mark.parametrize("layer_id", [2, 0])  # score-routed, hash-routed
def test_expert_parallel_moe_equals_full_moe(world_size, replicas, tokens, layer_id):
    run_local(world_size, lambda comm: check_parallel_moe(comm, layer_id, replicas, tokens))
