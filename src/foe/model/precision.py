"""The precision rule: steps that reduced precision would spoil (norms, rotary, routing, softmax over
logits) run in at least float32, and never below the input's own precision. bf16 and fp16 are upcast
to float32; float32 and float64 stay as they are (`.float()` would round float64 down)."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype those steps run in for data of `dtype`."""
    return torch.promote_types(dtype, torch.float32)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in `compute_dtype(x.dtype)` (x itself when it already is)."""
    return x.to(compute_dtype(x.dtype))


# The dtypes a model can run in, by the names the command line and configs use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype of a name in DTYPES; ValueError naming the choices otherwise."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]
