"""Data-parallel plumbing for training: process-group setup from torchrun's environment and gradient
averaging with one flat all-reduce.

Why not DDP: with top-k routing some experts may receive no token on one rank, which DDP only
tolerates with find_unused_parameters (an extra graph walk every step); one all-reduce over a flat
buffer after accumulation is simpler, and identical in result. This module knows nothing of models.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from foe.parallel.launch import init_distributed


def init_from_env(device: str = "cpu") -> tuple[int, int]:
    """(rank, world) from torchrun's variables, joined through foe's launcher (gloo on CPU, NCCL on CUDA)
    when world > 1; (0, 1) in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    return init_distributed(torch.device(device).type)


def all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Replace every grad with its mean over ranks (one all-reduce of one concatenated buffer)."""
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
