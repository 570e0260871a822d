"""x @ w for inference on the CPU with the weight pre-packed for oneDNN, the way vLLM's CPU backend
runs its linear layers.

PyTorch's own CPU matmul goes through MKL's sgemm; oneDNN's matmul on a weight reordered once into
its blocked layout ran 2.2x faster on this machine's cores for the shapes of a small MoE (a
[256, 256] x [256, 512] projection: 0.31 ms vs 0.68 ms, wall clock, one thread). The packed copy is
made on first use and kept on the parameter (keyed by the parameter's version, so a weight changed in
place is packed again); it doubles the weights' memory. Used only where it applies: CPU tensors in
float32 or bfloat16, with autograd and autocast off (training, float64 and CUDA take the plain product), and only
if this PyTorch build has oneDNN's linear ops (private ops inductor uses; if they go, so does this).
FOE_ONEDNN=0 turns it off.
"""

from __future__ import annotations

import functools
import os

import torch

DTYPES = (torch.float32, torch.bfloat16)
PACK_ROWS_HINT = 64  # the batch size oneDNN picks its layout for; any row count works
# oneDNN's call costs ~12 us before any work: MKL's product is faster below about this many
# multiply-adds (measured here: 1 x 256 x 512 takes 7 us by MKL, 17 us by oneDNN; 4 x 256 x 512 29 vs 18).
MIN_MACS = 1 << 19
OPT_OUT = "FOE_ONEDNN"


@functools.cache
def available() -> bool:
    if os.environ.get(OPT_OUT, "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.randn(8, 4)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT)
        x = torch.randn(3, 4)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(y, x @ w.t(), atol=1e-5))
    except Exception:  # ops renamed or missing in this build
        return False


def applies(x: torch.Tensor, w: torch.Tensor, out_features: int | None = None) -> bool:
    """Whether x @ w (w [..., K, N]; or a linear layer's [N, K] when out_features = N) takes oneDNN."""
    n = w.shape[-1] if out_features is None else out_features
    # Not under autocast: it would skip autocast's casts and compute in the weights' dtype.
    return (x.device.type == "cpu" and x.dtype in DTYPES and w.dtype == x.dtype and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and x.shape[-2] * x.shape[-1] * n >= MIN_MACS
            and available())


def _packed(w: torch.Tensor, index: int | str | None) -> torch.Tensor:
    """w (or w[index]) as oneDNN's packed [N, K] weight; index "linear": w is a linear layer's [N, K]."""
    cache: dict = w.__dict__.setdefault("_foe_onednn", {})
    entry = cache.get(index)
    # Inference tensors (a model built under inference_mode) keep no version counter: packed once.
    version = None if w.is_inference() else w._version
    if entry is None or entry[0] != version:
        dense = w.contiguous() if index == "linear" else (w if index is None else w[index]).t().contiguous()
        entry = (version, torch.ops.mkldnn._reorder_linear_weight(dense, PACK_ROWS_HINT))
        cache[index] = entry
    return entry[1]


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without bias (weight [N, K], x [..., K]), packed where that applies."""
    x_MK = x.reshape(-1, x.shape[-1])
    if not applies(x_MK, weight, weight.shape[0]):
        return torch.nn.functional.linear(x, weight)
    y = torch.ops.mkldnn._linear_pointwise(x_MK.contiguous(), _packed(weight, "linear"), None, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])


def matmul(x_MK: torch.Tensor, w: torch.Tensor, index: int | None = None) -> torch.Tensor:
    """x_MK @ w (w [K, N]), or x_MK @ w[index] for a stacked weight w [E, K, N]."""
    if not applies(x_MK, w):
        return x_MK @ (w if index is None else w[index])
    return torch.ops.mkldnn._linear_pointwise(x_MK.contiguous(), _packed(w, index), None, "none", [], "")


def group_matmul(x_GTK: torch.Tensor, w_GKN: torch.Tensor) -> torch.Tensor:
    """torch.bmm(x, w) over a small group axis, one packed product per group where that applies."""
    if not applies(x_GTK, w_GKN):
        return torch.bmm(x_GTK, w_GKN)
    if x_GTK.shape[0] == 1:
        return matmul(x_GTK[0], w_GKN, 0).unsqueeze(0)
    return torch.stack([matmul(x_GTK[g], w_GKN, g) for g in range(x_GTK.shape[0])])
