"""The Ray backend: one engine instance = W Ray actors in one placement group, each a
model worker holding E/W experts and its own requests, exchanging tokens at every MoE
layer over torch.distributed (gloo on CPU, nccl on GPU) inside the actors.

`ray.remote` is applied here and only here. The driver talks to each actor once
per step (`execute`), never per layer. The process group meets through a TCPStore that
the driver hosts. A dead actor fails the step with `WorkerLostError`; the group then
rebuilds itself (new actors, weights reloaded) before the next step. A KV handoff's
state goes through the object store or is pulled from the prefill actor
(cluster/backends/ray_handoff.py: the prefill actor ships each layer as its last prompt
chunk passes it; the driver passes only the ticket on; the decode actor fetches it). Its
export is bounded by the engine's `handoff_timeout_s`: a dead or slow exporting actor
fails that handoff alone (the engine's failure policy applies; the rank keeps the state
until the engine's release reaches it), and a dead actor is rebuilt at the next step.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

from cluster.backends.plan import ContextParallelPlan, assign_owners, merge_results, split_plan
from cluster.engine.requests import EngineUnavailableError
from workers.config import ModelConfig
from workers.step import StepPlan, StepResult

log = logging.getLogger("dsv4.ray")

PING_TIMEOUT_S = 10.0  # an idle actor that does not answer `ready` this fast is lost
INFO_TIMEOUT_S = 0.5  # routing stats for GetServerInfo / metrics: left out when a step holds the actors longer


class WorkerLostError(EngineUnavailableError):
    """A worker actor died or stopped answering; its instance is being rebuilt."""


class HandoffLostError(EngineUnavailableError):
    """A KV handoff's export failed: its actor died (the instance is rebuilt at its next
    step) or did not answer within the handoff timeout."""


class RankWorker:
    """One rank of an instance (a plain class; `RayWorkerGroup` wraps it with ray.remote)."""

    def __init__(self, checkpoint: str, rank: int, world_size: int, store_addr: tuple[str, int],
                 dtype: str, simulate_quant: bool, backend: str = "gloo", page_size: int = 128, device: str = "auto",
                 transport: str = "object_store") -> None:  # fmt: skip
        import ray
        import torch
        import torch.distributed as dist

        from cluster.backends.ranks import build_rank_worker
        from cluster.backends.ray_handoff import carrier_for
        from router.comm import DistCommunicator
        from workers.weights import serving_device

        if store_addr[0].startswith("127."):  # a cluster on one machine (loopback node addresses)
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(1)
        store = dist.TCPStore(store_addr[0], store_addr[1], is_master=False, timeout=timedelta(seconds=60))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=60))  # fmt: skip
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        self.worker = build_rank_worker(checkpoint, rank, world_size, lambda: DistCommunicator(backend),
                                        dtype=torch_dtype, simulate_quant=simulate_quant, page_size=page_size,
                                        device=device)  # fmt: skip
        # decode actors pull handed-off states over a group of two (collective), or from the object store
        dev = serving_device(device)  # this actor's GPU (Ray sets CUDA_VISIBLE_DEVICES), else the CPU
        self.worker.carrier = carrier_for(transport, dev, ray.get_runtime_context().current_actor)
        self.rank = rank
        self.export_delay = 0.0  # fault injection (tests): seconds each export waits first

    def ready(self) -> int:
        return self.rank

    def execute(self, plan: StepPlan) -> StepResult:
        return self.worker.execute(plan)

    def num_states(self) -> int:
        return self.worker.num_states()

    def routing_window(self):
        return self.worker.routing_window()

    def export(self, uid: str):
        if self.export_delay:  # the state is still held here while it waits
            time.sleep(self.export_delay)
        return self.worker.export(uid)

    def release(self, uid: str) -> None:
        self.worker.release(uid)

    def arm_fault(self, point: str, action: str, seconds: float = 0.0, times: int = 1) -> None:
        """Test hook: arm a fault point in this actor's process (workers/faults.py)."""
        from workers import faults

        faults.arm(point, action, seconds, times)

    def set_export_delay(self, seconds: float) -> None:
        """Test hook: make every later export wait `seconds` before it copies the state, so a
        test can kill this actor, or let the handoff time out, while the driver waits on it."""
        self.export_delay = seconds

    def state_spec(self):
        return self.worker.state_spec()

    # -- the collective handoff's holding side: run in the "handoff" concurrency group, beside steps
    def handoff_has(self, key: str) -> bool:
        return self.worker.carrier.has(key)

    def handoff_open_channel(self, name: str, addr: tuple[str, int]) -> None:
        self.worker.carrier.open_channel(name, addr)

    def handoff_send(self, key: str, name: str) -> None:
        self.worker.carrier.send(key, name)

    def handoff_drop(self, key: str) -> None:
        self.worker.carrier.drop(key)

    def handoff_close_channel(self, name: str) -> None:
        self.worker.carrier.close_channel(name)

    def node(self) -> str:
        import ray

        return ray.util.get_node_ip_address()


_HANDOFF_METHODS = ("handoff_has", "handoff_open_channel", "handoff_send", "handoff_drop", "handoff_close_channel")


class RayWorkerGroup:
    """W RankWorker actors stepping together; looks like one worker to the engine."""

    def __init__(
        self, checkpoint: str | Path, world_size: int, *, dtype: str = "float32", simulate_quant: bool = True,
        num_cpus: float = 1.0, num_gpus: float = 0.0, resources: list[dict[str, float]] | None = None,
        strategy: str = "SPREAD",
        step_timeout: float = 60.0, start_timeout: float = 180.0, backend: str = "gloo", page_size: int = 128,
        device: str = "auto", transport: str = "object_store",
    ) -> None:  # fmt: skip
        self.checkpoint, self.world_size = str(checkpoint), world_size
        self.dtype, self.simulate_quant = dtype, simulate_quant
        self.num_cpus, self.num_gpus, self.resources, self.strategy = num_cpus, num_gpus, resources, strategy
        self.step_timeout, self.start_timeout, self.backend = step_timeout, start_timeout, backend
        self.page_size, self.device, self.transport = page_size, device, transport
        self.model_config = ModelConfig.from_json(Path(checkpoint) / "config.json")
        self.owner: dict[str, int] = {}
        self.stopped = False
        self.held: dict[str, int] = {}  # uid -> tokens in its state
        self.prefix_rank: dict[str, int] = {}  # cached prefix key -> rank keeping it
        self.exporting: dict[str, int] = {}  # uid -> rank, while the driver waits for its export
        self.cp = ContextParallelPlan(world_size)
        self.state = "serving"
        self._start()

    # -- lifecycle ------------------------------------------------------------------------
    def _start(self) -> None:
        import ray
        import torch.distributed as dist
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        t0 = time.perf_counter()
        gpus = {"GPU": self.num_gpus} if self.num_gpus else {}
        bundles = [{"CPU": self.num_cpus, **gpus, **((self.resources or [{}] * self.world_size)[r])}
                   for r in range(self.world_size)]  # fmt: skip
        self.pg = placement_group(bundles, strategy=self.strategy)
        ray.get(self.pg.ready(), timeout=self.start_timeout)
        port = _free_port()
        self.store_host = ray.util.get_node_ip_address()  # reachable from every node of the cluster
        self.store = dist.TCPStore(self.store_host, port, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=60))  # fmt: skip
        for name in _HANDOFF_METHODS:  # served on a thread of their own, while a step runs
            ray.method(concurrency_group="handoff")(getattr(RankWorker, name))
        actor_cls = ray.remote(concurrency_groups={"handoff": 1})(RankWorker)  # the one place ray.remote is applied
        self.actors = [
            actor_cls.options(
                num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
            ).remote(self.checkpoint, r, self.world_size, (self.store_host, port), self.dtype, self.simulate_quant,
                     self.backend, self.page_size, self.device, self.transport)
            for r in range(self.world_size)
        ]  # fmt: skip
        ray.get([a.ready.remote() for a in self.actors], timeout=self.start_timeout)
        self.state_spec = ray.get(self.actors[0].state_spec.remote(), timeout=self.start_timeout)
        self.owner.clear()
        self.held.clear()
        self.prefix_rank.clear()
        self.cp.replicated.clear()
        log.info("ray instance up: %d workers in %.1fs", self.world_size, time.perf_counter() - t0)

    def stop(self) -> None:
        """Kill the actors and free the placement group; later steps fail instead of rebuilding."""
        import ray
        from ray.util.placement_group import remove_placement_group

        self.stopped = True
        for a in self.actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.pg)

    def rebuild(self) -> None:
        """New actors (and placement group) for all ranks; `state` says how it went. On
        failure the group is `down` and the error propagates; `check` tries again."""
        log.warning("rebuilding the ray instance (%d workers)", self.world_size)
        self.state = "rebuilding"
        try:
            self.stop()
            self._start()
        except Exception:
            self.state = "down"
            raise
        self.stopped = False
        self.state = "serving"

    def check(self) -> None:
        """Ping every actor (`ping_timeout`); a dead or unanswering one rebuilds the group."""
        import ray

        if self.stopped and self.state == "serving":  # stopped on purpose
            return
        if self.state == "down":
            self._rebuild_after("the last rebuild failed")
        try:
            ray.get([a.ready.remote() for a in self.actors], timeout=PING_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError) as e:
            self._rebuild_after(f"a worker of the instance was lost ({type(e).__name__})")

    def _rebuild_after(self, why: str) -> None:
        """Rebuild, then raise WorkerLostError (every request state was on the old actors)."""
        try:
            self.rebuild()
        except Exception as e:
            raise WorkerLostError(f"{why}; rebuilding failed ({type(e).__name__}: {e}), retried later") from e
        raise WorkerLostError(f"{why}; rebuilt")

    def nodes(self) -> list[str]:
        """The address of the node each rank runs on."""
        return self._ask("node", self.step_timeout)

    # -- the worker interface -------------------------------------------------------------
    def num_states(self) -> int:
        return sum(self._ask("num_states", self.step_timeout))

    def _ask(self, method: str, timeout: float) -> list:
        """Every actor's answer to an info call; WorkerLostError when one cannot answer (the
        engine's next check or step rebuilds the group)."""
        import ray

        if self.state != "serving":
            raise WorkerLostError(f"the instance is {self.state}")
        try:
            return ray.get([getattr(a, method).remote() for a in self.actors], timeout=timeout)
        except (ray.exceptions.RayError, TimeoutError) as e:
            raise WorkerLostError(f"{method}: a worker did not answer ({type(e).__name__})") from e

    def export(self, uid: str, timeout: float | None = None):
        """Hand a request's state over from the actor that holds it (through the object
        store), waiting at most `timeout` seconds (default: the step timeout). On failure
        (`HandoffLostError`) the rank keeps owning the request, so the engine's release of
        it (`StepPlan.finished`) reaches that rank: a slow export that finishes late has
        dropped the state itself, one that never ran has it dropped by the release."""
        import ray

        rank = self.owner[uid]
        ref = self.actors[rank].export.remote(uid)
        self.exporting[uid] = rank
        wait = self.step_timeout if timeout is None else timeout
        try:
            state = ray.get(ref, timeout=wait)
        except ray.exceptions.GetTimeoutError as e:
            raise HandoffLostError(f"exporting {uid} from rank {rank} took more than {wait:g}s") from e
        except ray.exceptions.RayError as e:
            raise HandoffLostError(f"exporting {uid} from rank {rank} failed ({type(e).__name__})") from e
        finally:
            self.exporting.pop(uid, None)
        if self.cp.drop(uid):  # the other ranks' replicas of a context-parallel prefill
            ray.get([a.release.remote(uid) for r, a in enumerate(self.actors) if r != rank], timeout=wait)
        self.owner.pop(uid)
        self.held.pop(uid, None)
        return state

    def check_import(self, state) -> str | None:
        """Why a handed-off state cannot be imported here (checked in the driver, against
        the layout rank 0 reported at start)."""
        return self.state_spec.problem(state)

    def routing_window(self):
        from router.stats import merge

        return merge(self._ask("routing_window", INFO_TIMEOUT_S))

    def execute(self, plan: StepPlan) -> StepResult:
        import ray

        if self.state == "down":
            self._rebuild_after("the last rebuild failed")
        assign_owners(self.owner, plan, self.world_size, self.held, self.page_size, self.prefix_rank)
        plans = split_plan(self.owner, plan, self.world_size, self.prefix_rank, self.cp)
        for uid in plan.finished:
            self.owner.pop(uid, None)
        refs = [a.execute.remote(p) for a, p in zip(self.actors, plans, strict=True)]
        try:
            results = ray.get(refs, timeout=self.step_timeout)
        except (ray.exceptions.RayError, TimeoutError) as e:
            if self.stopped and self.state == "serving":  # stopped on purpose: no placement group behind its back
                raise WorkerLostError("the instance was stopped") from e
            self._rebuild_after(f"a worker of the instance was lost ({type(e).__name__})")  # every state was there
        return merge_results(results)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
