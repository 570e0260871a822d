"""Distributed execution of unmodified MoE/FoE models over torch.distributed (gloo or NCCL).

    dims = ParallelDims("gp", world_size=P)     # validated launch description
    comm = parallelize(model, dims, rank)        # in place: this rank's weights + collectives
    model(inputs of this rank's data-parallel shard)   # every rank, every step (even with B = 0)
    comm.ledger                                  # bytes, calls and time of every collective

The model must hold the full weights on every rank when `parallelize` is called (same checkpoint or
same seed); each rank keeps only its slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from foe.model.transformer import Transformer
from foe.parallel.accounting import CommLedger, CommRecord
from foe.parallel.comm import Comm
from foe.parallel.launch import init_distributed, run_ranks
from foe.placement import STRATEGIES, ParallelDims
from foe.parallel.strategies import APPLY


@torch.no_grad()
def parallelize(model: Transformer, dims: ParallelDims, rank: int | None = None,
                ledger: CommLedger | None = None) -> Comm:
    dims.validate(model.cfg)
    if dims.strategy == "none":
        return Comm(dims, 0, ledger)
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: start the ranks with foe.parallel.run_ranks, or "
                           "join torchrun's job with foe.parallel.init_distributed() first")
    if dist.get_world_size() != dims.world_size:
        raise ValueError(f"launched with {dist.get_world_size()} processes but the layout asks for {dims.world_size}")
    rank = dist.get_rank() if rank is None else rank
    comm = Comm(dims, rank, ledger)
    APPLY[dims.strategy](model, comm)
    return comm


__all__ = ["Comm", "CommLedger", "CommRecord", "ParallelDims", "STRATEGIES", "init_distributed",
           "parallelize", "run_ranks"]
