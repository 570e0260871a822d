"""SwiGLU experts with 3-D weights, applied to rows already sorted by expert.

No routing and no communication here (that is `ffn.py` and `foe.parallel`): the input is x_RD whose
rows are grouped by expert, with counts_E rows per expert. Two implementations compute the same thing:
`grouped_mm` (the fast path: one grouped matrix product per projection, or in inference one expert at
a time written into the output: on the CPU wherever oneDNN on pre-packed weights applies
(`packed_matmul.py`), elsewhere for large batches, whichever is faster for the shape) and `loop` (a Python
loop over experts on contiguous slices; the readable reference the tests compare against).

torch._grouped_mm takes only float32, bf16 and fp16; in other dtypes (float64) the fast path computes
every batch expert by expert (streamed without gradients, the loop with them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from foe.model import packed_matmul

EXPERT_IMPLS = ("grouped_mm", "loop")
# The fast path computes inference batches with at least this many rows per expert on average
# expert by expert (`_streamed`), and everything else (training, small batches) with `_grouped_mm`.
STREAM_MIN_ROWS_PER_EXPERT = 128
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what torch._grouped_mm accepts


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

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if x_RD.shape[0] == 0:
            return x_RD.new_zeros(0, self.w2.shape[2])
        if self.impl == "loop":
            return self._loop(x_RD, counts_E)
        grad = torch.is_grad_enabled() and (x_RD.requires_grad or self.w13.requires_grad)
        grouped = x_RD.dtype in GROUPED_MM_DTYPES
        if grad and not grouped:
            return self._loop(x_RD, counts_E)
        if not grad and (not grouped or packed_matmul.applies(x_RD, self.w13)  # packed per expert: see _streamed
                         or x_RD.shape[0] >= STREAM_MIN_ROWS_PER_EXPERT * self.num_experts):
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
