"""KV caches the attention layer writes to and reads from.

The attention layer only knows the `KVCache.attend` contract: store the new keys/values, return the
attention output. Which memory layout lies behind it, and so how attention reads it (one dense buffer
per sequence and a masked SDPA here; a paged pool over a packed token stream in
`foe.engine.paged_attention`), is the cache's business.
A cache is sized by the attention modules it serves, so a model sharded by `foe.parallel` allocates
only its own KV heads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F


class KVCache(ABC):
    @abstractmethod
    def attend(self, layer: int, q_BNLK: torch.Tensor, k_BMLK: torch.Tensor, v_BMLK: torch.Tensor,
               pos_BL: torch.Tensor) -> torch.Tensor:
        """Store the new keys/values (at absolute positions pos_BL) and return o_BNLK: each query's
        attention over its sequence's keys up to its own position (grouped-query when N > M)."""


class DenseKVCache(KVCache):
    """One contiguous [B, H, max_len, K] buffer per layer; sequence b's token at position p lives in slot p.

    Right-padded batches work: a padded slot is overwritten by the sequence's next real token before
    any query at or after that position can see it, because the causal mask admits only slots <= pos.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def attend(self, layer: int, q_BNLK: torch.Tensor, k_BMLK: torch.Tensor, v_BMLK: torch.Tensor,
               pos_BL: torch.Tensor) -> torch.Tensor:
        k, v, mask = self.update(layer, k_BMLK, v_BMLK, pos_BL)
        return F.scaled_dot_product_attention(q_BNLK, k.to(q_BNLK.dtype), v.to(q_BNLK.dtype), attn_mask=mask,
                                              enable_gqa=q_BNLK.shape[1] != k_BMLK.shape[1])

    def update(self, layer: int, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor, pos_BL: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store new keys/values at positions pos_BL; return (k_BHSK, v_BHSK, mask_B1LS), where
        mask[b, 0, l, s] is True when query l of sequence b may attend to key s."""
        B, H, L, K = k_BHLK.shape
        if pos_BL.numel() == 0:  # an idle rank still joins every layer's collectives
            return self.k[layer, :0, :, :0], self.v[layer, :0, :, :0], pos_BL.new_zeros(0, 1, L, 0, dtype=torch.bool)
        if int(pos_BL.max()) >= self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; got position {int(pos_BL.max())}")
        idx = pos_BL[:, None, :, None].expand(B, H, L, K)
        self.k[layer, :B].scatter_(2, idx, k_BHLK.to(self.k.dtype))
        self.v[layer, :B].scatter_(2, idx, v_BHLK.to(self.v.dtype))
        S = int(pos_BL.max()) + 1  # only the slots some query can see
        mask = torch.arange(S, device=pos_BL.device)[None, None, None, :] <= pos_BL[:, None, :, None]
        return self.k[layer, :B, :, :S], self.v[layer, :B, :, :S], mask
