"""Fault injection for tests: named points in the serving path where a test makes the code
raise, stall or die, to check that nothing hangs, no KV page leaks, the client gets a
precise status and the server serves on.

Points (`POINTS`): a worker's step while it prefills (`worker.prefill`) or decodes
(`worker.decode`), its KV export (`worker.export`) and import (`worker.import`), the
gateway's write of a response to a stream (`gateway.stream`), and the pool router's
placement of a request (`router.place`). The code calls `hit(point)` there; with nothing
armed that is one dict lookup. A test arms a point in the process that runs it (in this
process for the in-process backend; through `RankWorker.arm_fault` in a Ray actor):

    faults.arm("worker.decode", "stall", seconds=5)   # the next decode step sleeps 5 s
    faults.arm("worker.export", "raise")              # the next export raises InjectedFault
    faults.arm("worker.prefill", "die")               # the process exits at once (a Ray actor)

Each armed fault fires `times` times (default once), then disarms itself.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

POINTS = ("worker.prefill", "worker.decode", "worker.export", "worker.import", "gateway.stream", "router.place")
ACTIONS = ("raise", "stall", "die")


class InjectedFault(RuntimeError):
    """Raised at an armed point (action `raise`)."""


@dataclass
class Fault:
    point: str
    action: str
    seconds: float = 0.0  # stall: how long
    times: int = 1  # hits before it disarms itself
    hits: int = 0


_armed: dict[str, Fault] = {}
_lock = threading.Lock()


def arm(point: str, action: str, seconds: float = 0.0, times: int = 1) -> Fault:
    """Make the next `times` hits of `point` raise, stall `seconds`, or end the process."""
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; known: {', '.join(POINTS)}")
    if action not in ACTIONS:
        raise ValueError(f"unknown fault action {action!r}; known: {', '.join(ACTIONS)}")
    fault = Fault(point, action, seconds, times)
    with _lock:
        _armed[point] = fault
    return fault


def disarm(point: str | None = None) -> None:
    """Disarm one point, or (None) every point."""
    with _lock:
        if point is None:
            _armed.clear()
        else:
            _armed.pop(point, None)


def hit(point: str) -> None:
    """Called by the code at `point`: fires the fault armed there, if any."""
    if not _armed:
        return
    with _lock:
        fault = _armed.get(point)
        if fault is None:
            return
        fault.hits += 1
        if fault.hits >= fault.times:
            del _armed[point]
    if fault.action == "stall":
        time.sleep(fault.seconds)
    elif fault.action == "die":
        os._exit(17)  # as abruptly as a crash: no cleanup, no exception handler runs
    else:
        raise InjectedFault(f"fault injected at {point}")
