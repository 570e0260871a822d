"""`FoEForCausalLM` for vLLM: a `foe` Transformer whose attention runs on vLLM's paged KV cache.

The model is `foe.model.Transformer` itself (same modules, same parameter names, same MoE and FoE
blocks with every sync mode), with each layer's attention swapped for `PagedGroupedAttention`. So the
residual sums, per-group norms, routers and experts are exactly foe's code, and a checkpoint's
model.safetensors loads name for name, prefixed by "model.".

What vLLM supplies: the scheduler, paged KV cache and attention kernels, sampling and the OpenAI
server. A MoE with Mixtral's router is instead built as vLLM's own Mixtral (`foe.vllm.mixtral`: fused
MoE kernels, vLLM's tensor/expert parallelism) when vLLM's attention takes its head size as it is.
Under vLLM tensor parallelism an FoE runs group parallel: each rank builds the model of its own groups
(`foe.vllm.group_parallel`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from foe.model.block import LayerInputs
from foe.model.checkpoint import WEIGHTS_FILE
from foe.model.precision import compute_dtype
from foe.model.transformer import Transformer
from foe.vllm.attention import PagedGroupedAttention
from foe.vllm.group_parallel import AllReduceGroupSum, local_config, shard_tensor

logger = logging.getLogger("vllm.foe")  # under vLLM's logger, which vLLM configures in every process

if TYPE_CHECKING:
    from vllm.config import VllmConfig


class FoEForCausalLM(nn.Module):
    """The architecture every foe config.json declares, for both `arch`s. A MoE whose router is
    Mixtral's becomes vLLM's own Mixtral (`foe.vllm.mixtral`), where vLLM's attention takes the head
    size; everything else (FoE, other MoE routers) is built here."""

    # vLLM would read every *.safetensors in the directory: a `foe train` checkpoint also holds
    # optimizer.safetensors. Read only the model's file (`foe.model.checkpoint.WEIGHTS_FILE`).
    allow_patterns_overrides = [WEIGHTS_FILE]

    def __new__(cls, *, vllm_config: VllmConfig, prefix: str = "") -> nn.Module:
        cfg = vllm_config.model_config.hf_config.to_model_config()
        if cls is FoEForCausalLM and paged_head_dim(cfg.head_dim) == cfg.head_dim:
            from foe.vllm.mixtral import FoEMixtralForCausalLM, mixtral_compatible

            if mixtral_compatible(cfg):
                # not an instance of cls, so Python does not call FoEForCausalLM.__init__ on it
                return FoEMixtralForCausalLM(vllm_config=vllm_config, prefix=prefix)
        return super().__new__(cls)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_rank
        from vllm.model_executor.layers.attention import Attention  # only where the model is built

        self.world = vllm_config.parallel_config.tensor_parallel_size
        self.rank = get_tensor_model_parallel_rank() if self.world > 1 else 0
        self.cfg = vllm_config.model_config.hf_config.to_model_config()
        cfg = local_config(self.cfg, self.world)  # this rank's groups (all of them at world 1)
        G, K = cfg.num_groups, cfg.head_dim
        Kp = paged_head_dim(K)
        logger.info("foe: %s checkpoint (sync=%s) built as FoEForCausalLM (foe's modules, paged head size %d, "
                    "rank %d of %d holds %d of %d groups)", cfg.arch, cfg.sync, Kp, self.rank, self.world,
                    cfg.num_groups, self.cfg.num_groups)
        self.model = Transformer(cfg)
        base = f"{prefix}.model" if prefix else "model"
        self.collectives: Counter = Counter()
        for i, layer in enumerate(self.model.layers):
            # One vLLM attention layer per foe layer covers all of this rank's groups (attention.py);
            # its prefix names its KV cache and must be unique and stable.
            paged = Attention(cfg.n_heads, Kp, K ** -0.5, num_kv_heads=cfg.n_kv_heads,
                              cache_config=vllm_config.cache_config, prefix=f"{base}.layers.{i}.attn.paged")
            layer.attn = PagedGroupedAttention(G, cfg.d_model, cfg.n_heads // G, cfg.n_kv_heads // G, K, paged, Kp)
            if self.world > 1:
                layer.reduce = AllReduceGroupSum(self.collectives)
        if self.world > 1:
            self.model.final_reduce = AllReduceGroupSum(self.collectives)
        self.forwards = 0

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: object | None = None, inputs_embeds: torch.Tensor | None = None
                ) -> torch.Tensor:
        """input_ids, positions: [T] for the T tokens vLLM scheduled (all sequences, flattened).
        Returns the final-normed hidden states [T, D]; `compute_logits` applies the head."""
        s = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        pos_BL = positions.view(1, -1)  # the flat batch as one row: attention metadata lives in vLLM
        cos, sin = self.model.rotary.tables(pos_BL, compute_dtype(s.dtype))
        ctx = LayerInputs(cos, sin, pos_BL, cache=None, token_mask_BL=None)
        s_BLD, p_GBLD = s.unsqueeze(0), None
        for layer in self.model.layers:
            s_BLD, p_GBLD, _ = layer(s_BLD, p_GBLD, ctx)
        if p_GBLD is not None:  # FoE sync="attention": the last sum of the groups' private streams
            s_BLD = s_BLD + self.model.final_reduce(p_GBLD, "final")
        if self.world > 1 and self.forwards < 2:  # show the collectives of one forward, once per rank
            logger.info("foe: rank %d, forward %d: %s all-reduces per forward over %d layers (%s), no all-to-all",
                        self.rank, self.forwards, sum(self.collectives.values()), len(self.model.layers),
                        dict(self.collectives))
        self.forwards += 1
        self.collectives.clear()
        return self.model.norm(s_BLD.squeeze(0))

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.model.head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy a foe model.safetensors in, name for name; returns the parameters loaded (vLLM checks
        that none is left out). A tied head is absent from the file and from named_parameters alike."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            key = f"model.{name}"
            if key not in params:
                raise ValueError(f"unexpected tensor {name!r} in the checkpoint")
            tensor = shard_tensor(name, tensor, self.rank, self.world)
            if params[key].shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(params[key].shape)}")
            with torch.no_grad():
                params[key].copy_(tensor)
            loaded.add(key)
        return loaded


# Head sizes vLLM 0.32's CPU attention backend accepts (CPUAttentionBackend.get_supported_head_sizes).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def paged_head_dim(head_dim: int) -> int:
    """The head size to run vLLM's paged attention at: ours, or on the CPU the smallest size its
    kernels accept that holds ours (the extra columns are zeros; see attention.py)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or head_dim in CPU_HEAD_SIZES:
        return head_dim
    fits = [h for h in CPU_HEAD_SIZES if h >= head_dim]
    if not fits:
        raise ValueError(f"head_dim {head_dim} exceeds what vLLM's CPU attention supports ({CPU_HEAD_SIZES[-1]})")
    return fits[0]
