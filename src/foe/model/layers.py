"""RMSNorm with a group axis, and rotary position embeddings."""

from __future__ import annotations

import torch
from torch import nn


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
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
    """Rotary embeddings (half-split layout) from a precomputed cos/sin table indexed by position."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def tables(self, pos_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, L, K/2] for absolute positions pos_BL."""
        if pos_BL.numel() and int(pos_BL.max()) >= self.cos.shape[0]:
            raise ValueError(f"position {int(pos_BL.max())} exceeds max_seq_len {self.cos.shape[0]}")
        return self.cos[pos_BL], self.sin[pos_BL]


def apply_rotary(x: torch.Tensor, cos_BLk: torch.Tensor, sin_BLk: torch.Tensor) -> torch.Tensor:
    """x: [..., B, L, heads, K]; cos/sin: [B, L, K/2] broadcast over heads."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos_BLk.unsqueeze(-2), sin_BLk.unsqueeze(-2)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)
