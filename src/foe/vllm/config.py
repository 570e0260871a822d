"""Our config.json as vLLM reads it: `foe.hf.FoEConfig`, plus Mixtral's field names for a MoE.

vLLM decides from the config alone, in its front process and before any model is built, whether a
model is a MoE (it looks for `num_local_experts` and the like; a MoE gets an expert-parallel group,
which vLLM's fused MoE layer needs). Our MoE checkpoints run on vLLM's Mixtral (`mixtral.py`), so their
config also answers to Mixtral's names. An FoE does not: its experts are foe's own modules, not vLLM's
fused MoE, so vLLM treats it as a dense model.
"""

from __future__ import annotations

from typing import Any

from foe.hf import FoEConfig


class VllmFoEConfig(FoEConfig):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.arch == "moe":
            self.num_local_experts = self.n_experts
            self.intermediate_size = self.expert_hidden
            self.rms_norm_eps = self.norm_eps
            self.rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}


def register_config() -> None:
    """Make transformers' AutoConfig build VllmFoEConfig for model_type "foe" in this process (vLLM
    reads configs through AutoConfig). Replaces foe.hf's registration of FoEConfig, so do it only in
    vLLM's processes (the plugin's entry point)."""
    from transformers import AutoConfig

    AutoConfig.register("foe", VllmFoEConfig, exist_ok=True)
