"""FoE/MoE grouped attention on vLLM's paged KV cache.

Same weights and math as `foe.model.attention.GroupedAttention` (it is a subclass: `wqkv`, `wo` keep
their names, so checkpoints load as they are); only the attention over past tokens changes, from SDPA
on a dense cache to vLLM's `Attention` layer, which owns the paged KV cache and the batch metadata.

vLLM flattens the batch: the input is [G, 1, T, D] (the group norms have broadcast a shared stream)
for the T tokens of all scheduled sequences.
Each group projects its own input (FoE's per-group residual streams) to its Q query heads and H KV
heads; the groups' heads are then laid side by side, group-major, so that one vLLM attention call with
n_heads query and n_kv_heads KV heads covers all groups: query head g*Q+i reads KV head
g*H + i // (Q/H), which is both our grouping and vLLM's (standard) GQA mapping. Rotary stays ours
(half-split, tables from float64 angles), so positions are encoded bit for bit as in `foe`.

vLLM's CPU attention kernels take only some head sizes (32, 64, 80, ...; not our presets' 16). The
paged attention then runs at a padded head size: q, k and v get zero columns, which add nothing to
q.k (the softmax scale stays 1/sqrt(K) of the real size) and come out as zero columns of the output,
dropped before `wo`. Exact, at the cost of a KV cache as large as the padded size.

No communication here: under group parallel (`group_parallel.py`) the module simply holds this rank's
groups, and vLLM's KV cache for it holds only their KV heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from foe.model.attention import GroupedAttention
from foe.model.kv_cache import KVCache
from foe.model.layers import apply_rotary


class PagedGroupedAttention(GroupedAttention):
    def __init__(self, num_groups: int, d_model: int, q_heads: int, kv_heads: int, head_dim: int,
                 paged: nn.Module, paged_head_dim: int) -> None:
        super().__init__(num_groups, d_model, q_heads, kv_heads, head_dim, init_std=0.0, out_std=0.0)
        # vllm Attention(n_heads, paged_head_dim, scale=head_dim ** -0.5, num_kv_heads=n_kv_heads);
        # it has no parameters, so the checkpoint's names are unchanged.
        self.paged = paged
        self.pad = paged_head_dim - head_dim

    def forward(self, x_GBLD: torch.Tensor, cos_BLk: torch.Tensor, sin_BLk: torch.Tensor,
                pos_BL: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        G, B, T, D = x_GBLD.shape  # B == 1: vLLM's flattened batch
        Q, H, K = self.q_heads, self.kv_heads, self.head_dim
        qkv = torch.bmm(x_GBLD.reshape(G, T, D), self.wqkv).view(G, 1, T, Q + 2 * H, K)
        q, k = apply_rotary(qkv[:, :, :, :Q + H], cos_BLk, sin_BLk).split([Q, H], dim=3)
        v = qkv[:, :, :, Q + H:]
        # [G, 1, T, heads, K] -> [T, G * heads * (K + pad)], group-major
        q_TN, k_TM, v_TM = (F.pad(t, (0, self.pad)).squeeze(1).transpose(0, 1).reshape(T, -1) for t in (q, k, v))
        o_TN = self.paged(q_TN, k_TM, v_TM)
        o_GTN = o_TN.view(T, G, Q, K + self.pad)[..., :K].reshape(T, G, Q * K).transpose(0, 1)
        return torch.bmm(o_GTN, self.wo).view(G, 1, T, D)
