"""RMSNorm with a group axis, and rotary position embeddings; both computed in at least float32
(`foe.model.precision`)."""

from __future__ import annotations

import torch
from torch import nn

from foe.model.precision import compute_dtype, upcast


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    xf = upcast(x)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class GroupRMSNorm(nn.Module):
    """RMSNorm with one weight vector per group: x_[G]...D -> x_G...D.

    A shared residual stream passed as x_1BLD is broadcast, so each group normalises it with its own
    weights in one op.
    """

    def __init__(self, num_groups: int, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_groups, dim))

    def forward(self, x_GD: torch.Tensor) -> torch.Tensor:
        """x: [G or 1, ..., D] -> [G, ..., D]; a leading 1 broadcasts a shared stream to all groups."""
        w = self.weight.view(self.weight.shape[0], *([1] * (x_GD.dim() - 2)), -1)
        return _rms(x_GD, self.eps) * w


class RMSNorm(nn.Module):
    """Plain RMSNorm (final norm before the LM head)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms(x, self.eps) * self.weight


class Rotary(nn.Module):
    """Rotary embeddings (half-split layout) from a cos/sin table indexed by position.

    The tables are not buffers: `model.to(dtype)` would round buffers to the model's dtype (bf16) or
    widen an already rounded float32 table (float64). Each (device, dtype) gets its own table instead,
    computed from float64 angles on first use and correctly rounded to that dtype. Nothing is built at
    construction, so a model made on the meta device (transformers' from_pretrained) needs no fix-up.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._tables:
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
            inv_freq = 1.0 / (self.theta ** exponents)
            angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float64), inv_freq)
            self._tables[key] = (angles.cos().to(device, dtype), angles.sin().to(device, dtype))
        return self._tables[key]

    def tables(self, pos_BL: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, L, K/2] in `dtype` for absolute positions pos_BL."""
        if pos_BL.numel() and int(pos_BL.max()) >= self.max_seq_len:
            raise ValueError(f"position {int(pos_BL.max())} exceeds max_seq_len {self.max_seq_len}")
        cos, sin = self._table(pos_BL.device, dtype)
        return cos[pos_BL], sin[pos_BL]


def apply_rotary(x: torch.Tensor, cos_BLk: torch.Tensor, sin_BLk: torch.Tensor) -> torch.Tensor:
    """x: [..., B, L, heads, K]; cos/sin: [B, L, K/2] broadcast over heads. Computed in at least float32
    (and at least the tables' precision), returned in x's dtype."""
    dtype = torch.promote_types(compute_dtype(x.dtype), cos_BLk.dtype)
    x1, x2 = x.to(dtype).chunk(2, dim=-1)
    cos, sin = cos_BLk.to(dtype).unsqueeze(-2), sin_BLk.to(dtype).unsqueeze(-2)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)
