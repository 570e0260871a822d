"""Grouped-query attention computed for G groups at once.

Weights carry a leading group axis: group g owns H KV heads, the Q query heads that share them and the
matching rows of the output projection. MoE uses G = 1 (H = n_kv_heads); FoE uses G = n_kv_heads
(H = 1). Each group may read its own input (FoE's per-group residual streams) and returns its own
partial output; summing the G outputs of a common input is exactly full GQA attention. The sum is not
done here: the block does it, so that a parallel layer can turn it into an all-reduce.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from foe.model.kv_cache import KVCache
from foe.model.layers import apply_rotary
from foe.model.packed_matmul import group_matmul


class GroupedAttention(nn.Module):
    def __init__(self, num_groups: int, d_model: int, q_heads: int, kv_heads: int, head_dim: int,
                 init_std: float, out_std: float) -> None:
        super().__init__()
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim  # per group
        # x @ w layout so one bmm serves all groups: [G, D, (Q + 2H) K] and [G, Q K, D].
        self.wqkv = nn.Parameter(torch.randn(num_groups, d_model, (q_heads + 2 * kv_heads) * head_dim) * init_std)
        self.wo = nn.Parameter(torch.randn(num_groups, q_heads * head_dim, d_model) * out_std)

    def forward(self, x_GBLD: torch.Tensor, cos_BLk: torch.Tensor, sin_BLk: torch.Tensor,
                pos_BL: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        G, B, L, D = x_GBLD.shape
        Q, H, K = self.q_heads, self.kv_heads, self.head_dim
        qkv = group_matmul(x_GBLD.reshape(G, B * L, D), self.wqkv).view(G, B, L, Q + 2 * H, K)
        # Queries and keys are adjacent heads: rotate them in one call.
        q, k = apply_rotary(qkv[:, :, :, :Q + H], cos_BLk, sin_BLk).split([Q, H], dim=3)
        v = qkv[:, :, :, Q + H:]
        # Merge groups into the head axis, group-major: query head g*Q+i reads KV head g*H + i//(Q/H),
        # which is the standard GQA mapping, so one SDPA call covers all groups.
        q_BNLK = q.permute(1, 0, 3, 2, 4).reshape(B, G * Q, L, K)
        k_BMLK = k.permute(1, 0, 3, 2, 4).reshape(B, G * H, L, K)
        v_BMLK = v.permute(1, 0, 3, 2, 4).reshape(B, G * H, L, K)
        if cache is not None:
            o = cache.attend(layer, q_BNLK, k_BMLK, v_BMLK, pos_BL)
        else:
            o = F.scaled_dot_product_attention(q_BNLK, k_BMLK, v_BMLK, is_causal=L > 1, enable_gqa=Q != H)
        o_GTN = o.view(B, G, Q, L, K).permute(1, 0, 3, 2, 4).reshape(G, B * L, Q * K)
        return group_matmul(o_GTN, self.wo).view(G, B, L, D)

    @property
    def num_kv_heads(self) -> int:
        """KV heads this module stores (what a KV cache for it must hold)."""
        return self.wqkv.shape[0] * self.kv_heads


def out_proj_std(init_std: float, n_layers: int) -> float:
    """GPT-2 style scaling of residual-branch output projections."""
    return init_std / math.sqrt(2 * n_layers)
