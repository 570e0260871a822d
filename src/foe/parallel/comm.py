"""The one seam every collective goes through: process groups of a launch, and wrappers around
all_reduce / all_to_all_single that record bytes and time in the rank's CommLedger.

Works on gloo (CPU) and NCCL (GPU) alike; uneven all-to-all always exchanges counts first, because a
split-size mismatch aborts the process under gloo instead of raising. A NCCL collective returns once it
is enqueued, so while the ledger records, a CUDA collective is timed between two device synchronisations
(`foe.device.synced_clock`): the time is the collective's, at the price of the overlap with compute that
the accounted run gives up.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from foe.device import synced_clock
from foe.parallel.accounting import CommLedger, CommRecord, ring_all_reduce_bytes
from foe.placement import ParallelDims


@dataclass
class Group:
    name: str
    ranks: list[int]
    pg: object  # torch ProcessGroup (None when the group is just this rank)

    @property
    def size(self) -> int:
        return len(self.ranks)


class Comm:
    """Process groups and accounted collectives for one rank of a launch described by `dims`."""

    def __init__(self, dims: ParallelDims, rank: int, ledger: CommLedger | None = None) -> None:
        self.dims, self.rank = dims, rank
        self.ledger = ledger or CommLedger(rank=rank)
        self.groups: dict[str, Group] = {}
        P = dims.world_size
        if dims.strategy in ("ep", "tp"):
            self.groups["world"] = Group("world", list(range(P)), dist.group.WORLD)
        elif dims.strategy == "gp":
            S, R = dims.num_sets, dims.ranks_per_group
            # Every rank must create every group, in the same order.
            for r in range(R):
                self._make("across_groups", [i * R + r for i in range(S)])
            for i in range(S):
                self._make("in_group", [i * R + r for r in range(R)])

    def _make(self, name: str, ranks: list[int]) -> None:
        pg = dist.new_group(ranks) if len(ranks) > 1 else None
        if self.rank in ranks:
            self.groups[name] = Group(name, ranks, pg)

    def _spans_nodes(self, g: Group) -> bool:
        return len({self.dims.node_of(r) for r in g.ranks}) > 1

    def _clock(self, x: torch.Tensor) -> Callable[[], float]:
        """The clock for a collective on x: synchronised on CUDA while accounting, plain otherwise."""
        return synced_clock(x.device) if self.ledger.enabled else time.perf_counter

    def all_reduce(self, x: torch.Tensor, group: str, layer: int, site: str) -> torch.Tensor:
        g = self.groups[group]
        if g.size == 1:
            return x
        x = x.contiguous()
        clock = self._clock(x)
        t0 = clock()
        dist.all_reduce(x, group=g.pg)
        dt = clock() - t0
        nbytes = ring_all_reduce_bytes(x.numel() * x.element_size(), g.size)
        inter = self._spans_nodes(g)
        self.ledger.add(CommRecord("all_reduce", group, layer, site, 0 if inter else nbytes,
                                   nbytes if inter else 0, dt))
        return x

    def all_to_all(self, x: torch.Tensor, send: list[int], recv: list[int], group: str, layer: int,
                   site: str, op: str = "all_to_all") -> torch.Tensor:
        """Uneven all_to_all_single along dim 0: send[j] rows to the j-th rank of the group."""
        g = self.groups[group]
        out = x.new_empty((sum(recv), *x.shape[1:]))
        row = math.prod(x.shape[1:]) * x.element_size()  # x.shape[1:] is the row
        clock = self._clock(x)
        t0 = clock()
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=g.pg)
        dt = clock() - t0
        me = self.dims.node_of(self.rank)
        intra = sum(n * row for r, n in zip(g.ranks, send) if r != self.rank and self.dims.node_of(r) == me)
        inter = sum(n * row for r, n in zip(g.ranks, send) if self.dims.node_of(r) != me)
        self.ledger.add(CommRecord(op, group, layer, site, intra, inter, dt))
        return out

    def exchange_counts(self, counts_Pe: torch.Tensor, group: str, layer: int) -> torch.Tensor:
        """counts_Pe[j, x]: rows I send to local expert x of the j-th group rank -> what each rank sends me."""
        n = counts_Pe.shape[0]
        flat = self.all_to_all(counts_Pe.reshape(-1), [counts_Pe.shape[1]] * n, [counts_Pe.shape[1]] * n,
                               group, layer, "dispatch", op="all_to_all_counts")
        return flat.view(n, -1)
