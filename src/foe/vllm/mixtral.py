"""foe's MoE checkpoints on vLLM's own Mixtral implementation (fused MoE kernels, vLLM's tensor and
expert parallelism), with the checkpoint read as it is.

Our MoE layer is Mixtral's: pre-norm RMSNorm, GQA attention with half-split (NeoX) rotary, a router
over all E experts with softmax, top-k and gate weights renormalised over the chosen k, SwiGLU experts.
What differs is only naming and layout, which `mixtral_weights` translates on the fly:

    embed.weight                         -> model.embed_tokens.weight
    layers.i.attn_norm.weight  [1, D]    -> model.layers.i.input_layernorm.weight   [D]
    layers.i.attn.wqkv         [1, D, (Q+2H)K] -> self_attn.{q,k,v}_proj.weight [n K, D]
    layers.i.attn.wo           [1, QK, D] -> self_attn.o_proj.weight                [D, QK]
    layers.i.ffn_norm.weight   [1, D]    -> post_attention_layernorm.weight          [D]
    layers.i.ffn.router.weight [1, D, E] -> block_sparse_moe.gate.weight             [E, D]
    layers.i.ffn.experts.w13   [E, D, 2F] (gate | up) -> experts.e.w1 (gate), w3 (up) [F, D]
    layers.i.ffn.experts.w2    [E, F, D] -> experts.e.w2                              [D, F]
    norm.weight, head.weight             -> model.norm.weight, lm_head.weight

Only when the router is Mixtral's (softmax scores, renormalised top-k: `mixtral_compatible`); other
MoE routers run on foe's own modules (`foe.vllm.model`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.models.mixtral import MixtralForCausalLM

from foe.config import ModelConfig
from foe.model.checkpoint import WEIGHTS_FILE

logger = init_logger("vllm.foe")  # under vLLM's logger, which vLLM configures in every process


def mixtral_compatible(cfg: ModelConfig) -> bool:
    return cfg.arch == "moe" and cfg.router_score == "softmax" and cfg.router_renorm


def mixtral_weights(cfg: ModelConfig, weights: Iterable[tuple[str, torch.Tensor]]
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """foe MoE tensors -> the Hugging Face Mixtral names and [out, in] layouts vLLM's loader takes."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    F = cfg.expert_hidden
    for name, t in weights:
        if name == "embed.weight":
            yield "model.embed_tokens.weight", t
        elif name == "norm.weight":
            yield "model.norm.weight", t
        elif name == "head.weight":
            yield "lm_head.weight", t
        else:
            _, i, rest = name.split(".", 2)
            p = f"model.layers.{i}."
            if rest == "attn_norm.weight":
                yield p + "input_layernorm.weight", t[0]
            elif rest == "ffn_norm.weight":
                yield p + "post_attention_layernorm.weight", t[0]
            elif rest == "attn.wqkv":
                wq, wk, wv = t[0].t().split([q, kv, kv])
                for proj, w in (("q", wq), ("k", wk), ("v", wv)):
                    yield p + f"self_attn.{proj}_proj.weight", w.contiguous()
            elif rest == "attn.wo":
                yield p + "self_attn.o_proj.weight", t[0].t().contiguous()
            elif rest == "ffn.router.weight":
                yield p + "block_sparse_moe.gate.weight", t[0].t().contiguous()
            elif rest == "ffn.experts.w13":
                for e in range(t.shape[0]):
                    w = t[e].t()  # [2F, D]: gate rows, then up rows
                    yield p + f"block_sparse_moe.experts.{e}.w1.weight", w[:F].contiguous()
                    yield p + f"block_sparse_moe.experts.{e}.w3.weight", w[F:].contiguous()
            elif rest == "ffn.experts.w2":
                for e in range(t.shape[0]):
                    yield p + f"block_sparse_moe.experts.{e}.w2.weight", t[e].t().contiguous()
            else:
                raise ValueError(f"unexpected tensor {name!r} in a foe MoE checkpoint")


class FoEMixtralForCausalLM(MixtralForCausalLM):
    allow_patterns_overrides = [WEIGHTS_FILE]  # not a training checkpoint's optimizer.safetensors

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        # the config answers to Mixtral's field names already (foe.vllm.config)
        cfg = vllm_config.model_config.hf_config.to_model_config()
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.foe_config = cfg
        logger.info("foe: MoE checkpoint built as FoEMixtralForCausalLM (vLLM's Mixtral)")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(mixtral_weights(self.foe_config, weights))
