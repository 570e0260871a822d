"""Native CPU kernels, compiled on first use with PyTorch's C++ extension builder (needs a C++ compiler
and ninja; the build takes ~30 s once and is cached in torch's extensions directory).

`paged_decode_attention` reads a decode batch's keys and values straight from the paged pool, where
the torch path must first gather them into a dense copy (`paged_attention.py`). Where the kernel
cannot be built (no compiler), or FOE_PAGED_KERNEL=0, the torch path is used: same results, slower.
The kernel reads CPU memory only; a pool on CUDA always takes the torch path (`decode_kernel_available`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
OPT_OUT = "FOE_PAGED_KERNEL"
BASE_NAME = "foe_paged_attention"


def _build_name() -> str:
    """The extension's name carries a hash of this CPU's instruction-set flags: the build uses
    -march=native, and torch caches builds by name, so a home directory shared with a machine of another
    CPU must not hand it a binary with instructions it lacks."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = "unknown"
    return f"{BASE_NAME}_{hashlib.sha1(flags.encode()).hexdigest()[:8]}"


@functools.cache
def _extension() -> ModuleType | None:
    if os.environ.get(OPT_OUT, "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import get_default_build_root, load
        name = _build_name()
        if not any(Path(get_default_build_root()).glob(f"*/{name}/{name}.so")):
            print(f"foe: compiling the native paged-attention kernel (first use only, ~30 s) into "
                  f"{get_default_build_root()}", file=sys.stderr, flush=True)
        # -ffast-math lets gcc call glibc's vector exp in the softmax; float64 still agrees with the
        # torch path to 1e-12 (tests/engine/test_paged_attention.py).
        return load(name, [str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp-simd", "-ffast-math"])
    except Exception as e:  # no compiler, no ninja, a failed build: the torch path still works
        warnings.warn(f"foe: the native paged-attention kernel could not be built ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); using the slower torch "
                      f"path. Set {OPT_OUT}=0 to skip the build.", stacklevel=2)
        return None


def decode_kernel_available(device: torch.device) -> bool:
    """Whether `paged_decode_attention` can run for tensors on `device` (builds the kernel on first call)."""
    return device.type == "cpu" and _extension() is not None


def paged_decode_attention(q_DNK: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           table_DW: torch.Tensor, lens_D: torch.Tensor) -> torch.Tensor:
    """o_DNK: query d (one token) attends to keys 0..lens[d]-1 held by its blocks table[d], in one layer
    of a `KVPool` (k_pool [blocks, M, K, block_size], v_pool [blocks, block_size, M, K]); query head n
    reads KV head n // (N / M)."""
    ext = _extension()
    assert ext is not None, "check decode_kernel_available first"
    # The C++ reads the tables and pools through host pointers: a CUDA tensor would crash it, not raise.
    if q_DNK.device.type != "cpu" or k_pool.device.type != "cpu":
        raise ValueError(f"paged_decode_attention is a CPU kernel; got tensors on {q_DNK.device}")
    return ext.paged_decode_attention(q_DNK, k_pool, v_pool, table_DW, lens_D, q_DNK.shape[-1] ** -0.5)
