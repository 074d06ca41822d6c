from __future__ import annotations

import time

import pytest
import torch

from router.comm import CollectiveTimeoutError, LocalGroup, make_communicator, run_local
from router.names import COMMUNICATORS

# send_splits[src][dst] for 3 ranks: uneven, zeros, and a rank that sends nothing
SPLITS = [[2, 0, 3], [0, 0, 0], [1, 4, 0]]


def rows(src: int, dst: int, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[n, 3]: recognisable rows src -> dst."""
    base = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) * 0.25
    return (base + 100 * src + 10 * dst + 0.5).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_local_all_to_all_uneven_and_zero_splits(dtype):
    def body(comm):
        r, w = comm.rank, comm.world_size
        send = torch.cat([rows(r, d, SPLITS[r][d], dtype) for d in range(w)])
        counts = comm.all_to_all_splits(torch.tensor(SPLITS[r]))
        assert counts.tolist() == [SPLITS[s][r] for s in range(w)]
        got = comm.all_to_all(send, SPLITS[r], counts.tolist())
        want = torch.cat([rows(s, r, SPLITS[s][r], dtype) for s in range(w)])
        assert got.dtype == dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        return got.shape[0]

    assert run_local(3, body) == [3, 4, 3]


def test_local_received_tensor_is_a_copy():
    def body(comm):
        send = torch.ones(2, 4)
        got = comm.all_to_all(send, [2], [2])
        send.zero_()
        assert torch.equal(got, torch.ones(2, 4))

    run_local(1, body)


def test_make_communicator_by_name():
    group = LocalGroup(2)
    comm = make_communicator("local", group=group, rank=1)
    assert (comm.rank, comm.world_size) == (1, 2)
    with pytest.raises(ValueError, match="known communicators: local, gloo, nccl"):
        make_communicator("mpi")
    with pytest.raises(ValueError, match="needs group=LocalGroup"):
        make_communicator("local", rank=0)
    with pytest.raises(ValueError, match="rank 2 out of range"):
        make_communicator("local", group=group, rank=2)
    with pytest.raises(ValueError, match="init_process_group first"):
        make_communicator("gloo")
    assert COMMUNICATORS == ("local", "gloo", "nccl")


def test_a_failing_rank_releases_the_others_with_its_own_error():
    def body(comm):
        if comm.rank == 1:
            raise KeyError("rank 1 broke")
        comm.all_to_all_splits(torch.zeros(3, dtype=torch.int64))

    start = time.monotonic()
    with pytest.raises(KeyError, match="rank 1 broke"):
        run_local(3, body, timeout=30)
    assert time.monotonic() - start < 5


def test_a_missing_peer_times_out_instead_of_hanging():
    def body(comm):
        if comm.rank == 0:
            comm.all_to_all_splits(torch.zeros(2, dtype=torch.int64))

    with pytest.raises(CollectiveTimeoutError, match="did not all arrive within 0.3s"):
        run_local(2, body, timeout=0.3)


def test_a_run_past_its_deadline_is_stopped():
    def body(comm):
        if comm.rank == 0:
            time.sleep(0.5)
        comm.all_to_all_splits(torch.zeros(2, dtype=torch.int64))

    with pytest.raises(CollectiveTimeoutError, match="still running after 0.2s"):
        run_local(2, body, timeout=10, run_timeout=0.2)
