"""FoE group parallel as vLLM tensor parallelism: rank r of P holds G/P whole groups.

A group is self-contained (FOE.md section 2): its query and KV heads, its rows of the output
projection, its norms, its router and its E/G experts. So rank r's model is simply a foe Transformer
of a *local* config with G/P groups, n_heads/P query heads and E/P experts (`local_config`), loaded
with its slice of every grouped tensor (`shard_tensor`), and with each group sum (`GroupSum`) turned
into a local sum plus one all-reduce across the P ranks (`AllReduceGroupSum`). Embedding, final norm
and head are replicated. Collectives per forward: one all-reduce per layer plus the final one (sync
"attention"), one per layer ("moe"), two per layer ("both"); none inside the MoE, and no all-to-all.

Not here: splitting one group over several ranks (P > G), and the MoE baseline, which runs on vLLM's
Mixtral with vLLM's own tensor/expert parallelism (`foe.vllm.mixtral`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import torch

from foe.config import ModelConfig
from foe.model.block import GroupSum

logger = logging.getLogger("vllm.foe")

GROUPED = ("attn.wqkv", "attn.wo", "attn_norm.weight", "ffn_norm.weight", "ffn.router.weight")  # [G, ...]
EXPERTS = ("ffn.experts.w13", "ffn.experts.w2")  # [E, ...], group g's experts at g*E/G.. (g+1)*E/G


def local_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The config of one rank's share: G/P groups, each exactly as in the full model."""
    if world == 1:
        return cfg
    if cfg.arch != "foe" or cfg.num_groups % world:
        raise NotImplementedError(
            f"foe's vLLM plugin runs {cfg.arch} (groups {cfg.num_groups}) at tensor parallel size 1 only, or an "
            f"FoE at a tensor parallel size dividing its groups; got {world}")
    return dataclasses.replace(cfg, n_heads=cfg.n_heads // world, n_kv_heads=cfg.n_kv_heads // world,
                               n_experts=cfg.n_experts // world, top_k=cfg.top_k // world)


def shard_tensor(name: str, t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s slice of checkpoint tensor `name` along its group (or expert) axis; replicated
    tensors whole. Groups are contiguous per rank, so experts are too."""
    if world == 1 or not name.endswith(GROUPED + EXPERTS):
        return t
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


class AllReduceGroupSum(GroupSum):
    """Sum this rank's groups, then all-reduce across ranks: the sum over all G groups. Counts its
    calls per site in `counts` (shared by the model's sums) so a run can show its collectives."""

    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def forward(self, x_GBLD: torch.Tensor, site: str) -> torch.Tensor:
        from vllm.distributed import tensor_model_parallel_all_reduce

        self.counts[site] += 1
        return tensor_model_parallel_all_reduce(x_GBLD.sum(0))
