"""Which device a command runs on, and the process-group backend that goes with it.

`--device auto` is CUDA when torch sees a GPU, else the CPU. A rank of a multi-rank job on CUDA takes
the GPU of its local rank (one GPU per local rank, as torchrun does); collectives then go over NCCL,
and over gloo on the CPU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The torch device `name` (auto, cpu, cuda or cuda:N) means for a process of `local_rank` on its host.
    ValueError when CUDA is asked for and absent, or when the host has too few GPUs for its ranks."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)} (or cuda:N), got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
    if ":" in name:
        if local_rank > 0:  # every local rank would share that GPU, which NCCL refuses
            raise ValueError(f"--device {name} names one GPU, but this host runs several ranks: use --device cuda "
                             f"(each local rank takes the GPU of its index)")
        return torch.device(name)
    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if count == 1 and visible and "," not in visible:
        return torch.device("cuda", 0)  # one GPU made visible to each process (a scheduler's way): that one
    if local_rank >= count:
        raise ValueError(f"local rank {local_rank} needs a GPU of its own, but this host has {count}; "
                         f"run at most {count} ranks per node")
    return torch.device("cuda", local_rank)


def backend_for(device: torch.device | str) -> str:
    """The torch.distributed backend for ranks on `device`: NCCL on CUDA, gloo on the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on `device` (CUDA kernels run asynchronously; a no-op on the CPU), so that a
    wall-clock reading after it covers the work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced_clock(device: torch.device | str, clock: Callable[[], float] = time.perf_counter
                 ) -> Callable[[], float]:
    """`clock` made fit to time work on `device`: on CUDA each reading first waits for the queued work
    (kernels and NCCL collectives return once enqueued), so `t0 = c(); work(); c() - t0` covers the work
    and not the work queued before it. `clock` itself on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return clock

    def read() -> float:
        torch.cuda.synchronize(device)
        return clock()
    return read
