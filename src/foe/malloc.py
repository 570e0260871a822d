"""glibc malloc settings that keep large tensor buffers in the process instead of returning them
to the kernel after every forward pass.

Why: PyTorch's CPU tensors come straight from malloc. glibc serves blocks above a (self-adjusting)
threshold with a fresh mmap() and unmaps them on free, and trims the heap top back to the kernel, so
a forward pass that allocates tens of MB of activations page-faults all of them in again on every
call. On a 2-vCPU VM that was a third to a half of an MoE feed-forward at 2k-8k tokens (the routed-row
gather, the expert outputs, the weighted combine; docs/model-benchmark.md has the measurements).
Raising both thresholds makes freed blocks stay in the heap for the next call, the way a CUDA
caching allocator keeps GPU memory. Cost: the process keeps its peak heap (RSS does not shrink
after one large batch), which an inference server or a benchmark wants anyway.

The settings are also exported as glibc's environment variables, so processes this one starts
(ranks, engine workers, a served model) get them from their first allocation on. Set
FOE_MALLOC_TUNING=0 to leave malloc alone. Elsewhere than glibc (macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap and stay there when freed
OPT_OUT = "FOE_MALLOC_TUNING"


def tune_malloc(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Apply the settings to this process and its future children; True when glibc took them."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, threshold) and mallopt(M_TRIM_THRESHOLD, threshold)):
        return False  # a libc with mallopt that refuses (musl's is a no-op returning 0)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(threshold))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(threshold))
    return True
