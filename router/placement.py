"""Expert placement: which workers hold which routed experts, and which copy a token uses.

Legend: E routed experts, W workers, P (token, expert) pairs, Rmax most owners of any expert.

Primary copies are contiguous blocks: worker w holds experts [w * E/W, (w + 1) * E/W).
Redundant replicas (EPLB) add extra owners per expert: `replicas={expert: [rank, ...]}`.
An expert's owners are ordered primary first, then its replicas in the given order.

Replica choice (deterministic, no randomness, no communication): the (token, expert) pair of
local token t on source worker s at layer l goes to owner number

    (t + l + s) mod n_owners(expert)

so consecutive tokens, successive layers and different source workers spread over the
copies, and a rerun of the same batch routes exactly the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """Expert -> owning workers for one expert-parallel instance (the same in every MoE layer)."""

    num_experts: int  # E routed experts
    num_workers: int  # W workers in the instance
    replicas: Mapping[int, Sequence[int]] = field(default_factory=dict, hash=False)  # expert -> extra owner ranks

    def __post_init__(self) -> None:
        e, w = self.num_experts, self.num_workers
        if e <= 0 or w <= 0:
            raise ValueError(f"num_experts={e} and num_workers={w} must both be positive")
        if e % w:
            raise ValueError(f"num_experts={e} is not divisible by num_workers={w}")
        clean: dict[int, tuple[int, ...]] = {}
        for expert, ranks in sorted(self.replicas.items()):
            if not 0 <= expert < e:
                raise ValueError(f"replica for expert {expert}: expert ids are 0..{e - 1}")
            ranks = tuple(int(r) for r in ranks)
            if any(not 0 <= r < w for r in ranks):
                raise ValueError(f"replicas of expert {expert} on ranks {list(ranks)}: ranks are 0..{w - 1}")
            owners = (self.primary(expert), *ranks)
            if len(set(owners)) != len(owners):
                raise ValueError(f"expert {expert} has owners {list(owners)}: a rank may hold an expert only once")
            if ranks:
                clean[expert] = ranks
        object.__setattr__(self, "replicas", MappingProxyType(clean))

    @property
    def experts_per_worker(self) -> int:
        """Primary experts per worker (E / W)."""
        return self.num_experts // self.num_workers

    def primary(self, expert: int) -> int:
        """The rank holding `expert`'s primary copy."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range 0..{self.num_experts - 1}")
        return expert // self.experts_per_worker

    def owners(self, expert: int) -> list[int]:
        """All ranks holding `expert`: primary first, then replicas."""
        return [self.primary(expert), *self.replicas.get(expert, ())]

    def local_experts(self, rank: int) -> list[int]:
        """Global ids of the experts `rank` holds (primary block + replicas), sorted.

        Position i in this list is local expert id i: the order of `ExpertGroup`'s weights
        when built with `MoE(..., expert_ids=local_experts(rank))`.
        """
        if not 0 <= rank < self.num_workers:
            raise ValueError(f"rank {rank} out of range 0..{self.num_workers - 1}")
        n = self.experts_per_worker
        extra = [e for e, ranks in self.replicas.items() if rank in ranks]
        return sorted([*range(rank * n, (rank + 1) * n), *extra])

    @cached_property
    def owner_table(self) -> torch.Tensor:
        """[E, Rmax] int64: owner j of expert e (primary at j = 0), -1 past its last owner."""
        rmax = 1 + max((len(r) for r in self.replicas.values()), default=0)
        table = torch.full((self.num_experts, rmax), -1, dtype=torch.int64)
        for e in range(self.num_experts):
            owners = self.owners(e)
            table[e, : len(owners)] = torch.tensor(owners)
        return table

    @cached_property
    def owner_counts(self) -> torch.Tensor:
        """[E] int64: number of owners of each expert (1 + its replicas)."""
        return (self.owner_table >= 0).sum(dim=1)

    @cached_property
    def local_index(self) -> torch.Tensor:
        """[W, E] int64: local expert id of global expert e on rank w, -1 where w does not hold it."""
        table = torch.full((self.num_workers, self.num_experts), -1, dtype=torch.int64)
        for w in range(self.num_workers):
            held = torch.tensor(self.local_experts(w))
            table[w, held] = torch.arange(len(held))
        return table

    def pick_owners(self, expert_ids: torch.Tensor, token_ids: torch.Tensor, layer: int, src_rank: int) -> torch.Tensor:
        """The rank each (token, expert) pair goes to, by the module's replica rule.

        expert_ids [P] int64 global expert ids, token_ids [P] int64 local token index on the
        source worker -> ranks [P] int64 (on expert_ids' device).
        """
        dev = expert_ids.device
        choice = (token_ids + (layer + src_rank)) % self.owner_counts.to(dev)[expert_ids]
        return self.owner_table.to(dev)[expert_ids, choice]
