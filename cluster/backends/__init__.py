"""Backends: where an instance's workers run, each behind the `WorkerGroup` interface.

- `inprocess` (`local.py`): W model workers on threads of this process, `local` collectives.
- `ray` (`ray_group.py`): W Ray actors in one placement group, gloo/nccl collectives;
  their KV handoff carriers are in `ray_handoff.py`.

Both split a step's plan over their ranks with `plan.py` and build each rank's worker
with `ranks.py`. `build_group(name, ...)` starts one instance's group by backend name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the manifest imports this registry for its names when a command starts: no torch here
    from cluster.backends.group import GroupSpec, WorkerGroup


def _inprocess(spec: GroupSpec) -> WorkerGroup:
    from cluster.backends.local import LocalWorkerGroup

    return LocalWorkerGroup.load(spec.checkpoint, spec.workers, dtype=spec.dtype, simulate_quant=spec.simulate_quant,
                                 progress=spec.progress, page_size=spec.page_size, device=spec.device)  # fmt: skip


def _ray(spec: GroupSpec) -> WorkerGroup:
    import ray

    from cluster.backends.ray_group import RayWorkerGroup

    if not ray.is_initialized():
        ray.init(address=spec.ray_address)
    return RayWorkerGroup(
        spec.checkpoint, spec.workers, dtype=str(spec.dtype).removeprefix("torch."),
        simulate_quant=spec.simulate_quant, num_cpus=spec.num_cpus, num_gpus=spec.num_gpus,
        resources=[dict(spec.resources)] * spec.workers, strategy="SPREAD" if spec.placement == "spread" else "PACK",
        backend=spec.communicator, page_size=spec.page_size, device=spec.device, transport=spec.handoff_transport,
    )  # fmt: skip


BACKENDS: dict[str, Callable[[GroupSpec], WorkerGroup]] = {"inprocess": _inprocess, "ray": _ray}


def build_group(backend: str, spec: GroupSpec) -> WorkerGroup:
    """Start one instance's workers on `backend` (a name in BACKENDS)."""
    build = BACKENDS.get(backend)
    if build is None:
        raise ValueError(f"unknown backend {backend!r}; known backends: {', '.join(BACKENDS)}")
    return build(spec)
