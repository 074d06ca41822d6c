"""dispatch/combine over real gloo process groups (W processes, TCPStore on 127.0.0.1)."""

from __future__ import annotations

import pytest

from tests.router.support import check_parallel_moe, run_gloo_suite, spawn_gloo


@pytest.mark.parametrize("world_size", [2, 4])
def test_gloo_dispatch_combine(world_size):
    spawn_gloo(world_size, run_gloo_suite)


def test_gloo_expert_parallel_moe():
    spawn_gloo(2, check_parallel_moe, 2, {5: [0]}, [6, 0])


def test_gloo_failure_in_one_process_is_reported():
    with pytest.raises(Exception, match="deliberate failure on rank 1"):
        spawn_gloo(2, _fail_on_rank_1)


def _fail_on_rank_1(comm) -> None:
    if comm.rank == 1:
        raise RuntimeError("deliberate failure on rank 1")
