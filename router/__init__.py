"""router: the expert-parallel data plane (SPEC §6, DESIGN §4).

Routing (`route`), expert placement (`ExpertPlacement`), `dispatch`/`combine` of token rows
to the workers that hold the chosen experts, over a `Communicator` chosen by name
(`local`, `gloo`, `nccl`), and `moe_reference`, the single-worker oracle of dispatch∘combine.
"""

from __future__ import annotations

from router.comm import (
    COMMUNICATORS,
    CollectiveTimeoutError,
    Communicator,
    DistCommunicator,
    LocalCommunicator,
    LocalGroup,
    make_communicator,
    run_local,
)
from router.dispatch import DispatchHandle, combine, dispatch, moe_reference
from router.gate import route
from router.placement import ExpertPlacement

__all__ = [
    "COMMUNICATORS",
    "CollectiveTimeoutError",
    "Communicator",
    "DispatchHandle",
    "DistCommunicator",
    "ExpertPlacement",
    "LocalCommunicator",
    "LocalGroup",
    "combine",
    "dispatch",
    "make_communicator",
    "moe_reference",
    "route",
    "run_local",
]
