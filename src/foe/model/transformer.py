"""The decoder-only transformer: embed -> L blocks (MoE or FoE) -> final norm -> LM head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from foe.config import ModelConfig
from foe.model.block import Block, GroupSum, LayerInputs
from foe.model.foe import FoEBlock
from foe.model.kv_cache import DenseKVCache, KVCache
from foe.model.layers import RMSNorm, Rotary
from foe.model import packed_matmul
from foe.model.moe import MoEBlock
from foe.model.precision import compute_dtype


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, L, V], or [N, V] when `logits_at` selects N token rows
    aux_loss: torch.Tensor  # load-balancing loss, mean over layers and routing domains (train mode only; 0 in eval)
    z_loss: torch.Tensor  # router z-loss, mean over layers (train mode only; 0 in eval)
    expert_counts: torch.Tensor  # [n_layers, E_local] tokens each (local) expert received


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, expert_impl: str = "grouped_mm") -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleList(
            FoEBlock(cfg, i, expert_impl, sync=cfg.sync) if cfg.arch == "foe" else MoEBlock(cfg, i, expert_impl)
            for i in range(cfg.n_layers))
        self.final_reduce = GroupSum()  # FoE sync="attention": the last sum of the private streams
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=cfg.init_std)

    def forward(self, input_ids_BL: torch.Tensor, pos_BL: torch.Tensor | None = None,
                cache: KVCache | None = None, token_mask_BL: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None) -> ModelOutput:
        """input_ids_BL: token ids. pos_BL: absolute positions (default 0..L-1 per row). cache: KV
        cache to write and read (None: plain causal attention over this input). token_mask_BL: False
        marks padding, which the experts skip. logits_at: flat row indices into B*L; only those rows
        get logits (decode needs one row per sequence, not B*L)."""
        B, L = input_ids_BL.shape
        if pos_BL is None:
            pos_BL = torch.arange(L, device=input_ids_BL.device).expand(B, L)
        cos, sin = self.rotary.tables(pos_BL, compute_dtype(self.embed.weight.dtype))
        ctx = LayerInputs(cos, sin, pos_BL, cache, token_mask_BL)
        s = self.embed(input_ids_BL)
        p = None
        aux, z, counts = [], [], []
        layer: Block
        for layer in self.layers:
            s, p, r = layer(s, p, ctx)
            aux.append(r.aux_loss)
            z.append(r.z_loss)
            counts.append(r.counts_E)
        if p is not None:
            s = s + self.final_reduce(p, "final")
        if logits_at is not None:
            s = s.reshape(B * L, s.shape[-1])[logits_at]
        logits = packed_matmul.linear(self.norm(s), self.head.weight)  # = self.head(...), oneDNN on the CPU
        return ModelOutput(logits, torch.stack(aux).mean(), torch.stack(z).mean(), torch.stack(counts))

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None
                  ) -> DenseKVCache:
        """A dense KV cache for this model's (possibly sharded) KV heads."""
        attn = self.layers[0].attn
        return DenseKVCache(len(self.layers), batch, attn.num_kv_heads, max_len or self.cfg.max_seq_len,
                            self.cfg.head_dim, dtype or self.embed.weight.dtype, self.embed.weight.device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
