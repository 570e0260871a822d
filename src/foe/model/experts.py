"""SwiGLU experts with 3-D weights, applied to rows already sorted by expert.

No routing and no communication here (that is `ffn.py` and `foe.parallel`): the input is x_RD whose
rows are grouped by expert, with counts_E rows per expert. Two implementations compute the same thing:
`grouped_mm` (the fast path) and `loop` (a Python loop over experts on contiguous slices; the readable
reference the tests compare against). The fast path picks per device (`GroupedExperts.path`):

- CUDA: one `torch._grouped_mm` per projection, with or without gradients. In bf16 on sm90/sm100 (H100,
  H200, B200) torch runs it as one CUTLASS kernel with no host sync; in float32 and fp16, or on other
  GPUs, torch itself loops over the experts.
- CPU: inference expert by expert written into the output (`_streamed`) wherever oneDNN on pre-packed
  weights applies (`packed_matmul.py`) or batches are large, `torch._grouped_mm` otherwise (training,
  small batches).

torch._grouped_mm takes only float32, bf16 and fp16, with every row stride a multiple of 16 bytes
(`grouped_mm_unsupported`); other experts (float64, odd sizes) are computed expert by expert instead
(streamed without gradients, the loop with them), on CUDA with a warning that says why.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from foe.model import packed_matmul

EXPERT_IMPLS = ("grouped_mm", "loop")
# On the CPU the fast path computes inference batches with at least this many rows per expert on
# average expert by expert (`_streamed`), and everything else (training, small batches) with `_grouped_mm`.
STREAM_MIN_ROWS_PER_EXPERT = 128
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what torch._grouped_mm accepts


def grouped_mm_unsupported(dtype: torch.dtype, d_model: int, hidden: int) -> str | None:
    """Why torch._grouped_mm cannot multiply experts of this dtype and size (None: it can). Besides the
    dtype, torch checks (on the CPU too, as of 2.13) that every operand's row stride is a multiple of 16
    bytes, which the GPU's TMA loads need: here rows of d_model, 2 * hidden and hidden elements."""
    if dtype not in GROUPED_MM_DTYPES:
        return f"torch._grouped_mm has no {dtype} (only float32, bfloat16, float16)"
    align = 16 // dtype.itemsize
    if d_model % align or hidden % align:
        return (f"torch._grouped_mm needs 16-byte row strides: d_model ({d_model}) and expert_hidden ({hidden}) "
                f"must be multiples of {align} in {dtype}")
    return None


@functools.cache
def _warn_fallback(reason: str) -> None:
    """Once per reason: a GPU computing experts one by one is slow enough that the user should know."""
    warnings.warn(f"foe: CUDA experts run expert by expert, not grouped: {reason}", stacklevel=3)


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, hidden: int, init_std: float, out_std: float,
                 impl: str = "grouped_mm") -> None:
        super().__init__()
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"expert impl must be one of {EXPERT_IMPLS}, got {impl!r}")
        self.impl = impl
        self.w13 = nn.Parameter(torch.randn(num_experts, d_model, 2 * hidden) * init_std)  # gate | up
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, d_model) * out_std)

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    def path(self, x_RD: torch.Tensor) -> tuple[str, str | None]:
        """How `forward` computes x_RD: ("grouped_mm" | "streamed" | "loop", why not grouped_mm, or None
        when that is the device's choice rather than a limitation)."""
        if self.impl == "loop":
            return "loop", None
        grad = torch.is_grad_enabled() and (x_RD.requires_grad or self.w13.requires_grad)
        blocker = grouped_mm_unsupported(x_RD.dtype, self.w13.shape[1], self.w2.shape[1])
        if blocker is not None:
            return ("loop" if grad else "streamed"), blocker
        # CPU inference only: oneDNN on weights packed per expert, or cache-friendly streaming of large
        # batches. On CUDA streaming would read the counts on the host and launch per expert, where the
        # grouped product is one launch (bf16 on sm90+) with no host sync.
        if not grad and x_RD.device.type == "cpu" and (
                packed_matmul.applies(x_RD, self.w13)
                or x_RD.shape[0] >= STREAM_MIN_ROWS_PER_EXPERT * self.num_experts):
            return "streamed", None
        return "grouped_mm", None

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if x_RD.shape[0] == 0:
            return x_RD.new_zeros(0, self.w2.shape[2])
        path, blocker = self.path(x_RD)
        if blocker is not None and x_RD.is_cuda:
            _warn_fallback(blocker)
        if path == "loop":
            return self._loop(x_RD, counts_E)
        if path == "streamed":
            return self._streamed(x_RD, counts_E)
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        h = torch._grouped_mm(x_RD, self.w13.to(x_RD.dtype), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        return torch._grouped_mm((F.silu(gate) * up).contiguous(), self.w2.to(x_RD.dtype), offs=offs)

    def _streamed(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Inference with many rows per expert: one expert at a time, written straight into the output.
        The [rows, 2F] and [rows, F] intermediates then stay in cache instead of making whole-batch
        round trips through memory; on CPU that is ~25% faster than `_grouped_mm` from ~128 rows per
        expert on (measured at 8k-32k rows, `foe bench model`), and slower below (per-expert overhead)."""
        # oneDNN on weights packed once (packed_matmul.py), judged per expert's rows
        packed = packed_matmul.applies(x_RD, self.w13)
        w13, w2 = (self.w13, self.w2) if packed else (self.w13.to(x_RD.dtype), self.w2.to(x_RD.dtype))
        out = None
        start = 0
        for e, n in enumerate(counts_E.tolist()):
            if n:
                gate, up = packed_matmul.matmul(x_RD[start:start + n], w13, e).chunk(2, dim=-1)
                h = F.silu(gate).mul_(up)
                if out is None:
                    out = h.new_empty(x_RD.shape[0], w2.shape[2])
                if packed and packed_matmul.applies(h, w2):
                    out[start:start + n] = packed_matmul.matmul(h, w2, e)
                else:
                    # Under autocast the first product ran in bf16, but mm's out= variant is not autocast:
                    # the buffer and the second weight take h's dtype explicitly (no-ops without autocast).
                    torch.mm(h, w2[e].to(h.dtype), out=out[start:start + n])
            start += n
        return out

    def _loop(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        out, start = [], 0
        for e, n in enumerate(counts_E.tolist()):
            if n:
                gate, up = (x_RD[start:start + n] @ self.w13[e]).chunk(2, dim=-1)
                out.append((F.silu(gate) * up) @ self.w2[e])
            start += n
        return torch.cat(out)
