"""Use foe checkpoints from Hugging Face `transformers` (and so from `lm_eval --model hf`).

    import foe.hf  # registers model_type "foe" with AutoConfig / AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("runs/foe/step_00002000")
    tok = AutoTokenizer.from_pretrained("runs/foe/step_00002000")

FoEForCausalLM holds the very modules of foe.model.Transformer under the same names, so the
checkpoint's model.safetensors loads without any key mapping, and runs Transformer.forward on them:
the logits are those of the bare model. Generation re-runs the whole prefix every step (no KV cache
through this wrapper; the foe engine is the fast path). This module adds no model code of its own.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PretrainedConfig,
                          PreTrainedModel)
from transformers.modeling_outputs import CausalLMOutputWithPast

from foe.config import ModelConfig
from foe.model.precision import upcast
from foe.model.transformer import Transformer

_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]
# transformers treats a config attribute named like a generation parameter (top_k) as a mistake, so
# the config keeps the experts-per-token count as `num_experts_per_tok`, as Mixtral does.
_RENAMED = {"top_k": "num_experts_per_tok"}


class FoEConfig(PretrainedConfig):
    model_type = "foe"
    attribute_map = {"num_hidden_layers": "n_layers", "hidden_size": "d_model", "num_attention_heads": "n_heads",
                     "num_key_value_heads": "n_kv_heads", "max_position_embeddings": "max_seq_len"}

    def __init__(self, **kwargs: Any) -> None:
        own = {_RENAMED.get(k, k): kwargs.pop(k) for k in list(kwargs) if k in _FIELDS or k in _RENAMED.values()}
        defaults = ModelConfig()
        for name in _FIELDS:
            key = _RENAMED.get(name, name)
            setattr(self, key, own.get(key, getattr(defaults, name)))
        kwargs.setdefault("tie_word_embeddings", bool(self.tie_embeddings))
        kwargs.setdefault("use_cache", False)  # no HF KV cache: every generate step re-runs the prefix
        super().__init__(**kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(**{name: getattr(self, _RENAMED.get(name, name)) for name in _FIELDS})


class FoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = FoEConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["MoEBlock", "FoEBlock"]

    def __init__(self, config: FoEConfig) -> None:
        super().__init__(config)
        core = Transformer(config.to_model_config())
        self.cfg = core.cfg
        for name, child in core.named_children():  # same parameter names as a foe checkpoint
            self.add_module(name, child)
        if self.cfg.tie_embeddings:
            self._tied_weights_keys = {"head.weight": "embed.weight"}
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Parameters come from the checkpoint (or Transformer's own init), not from transformers' default
        # init. The rotary tables are not buffers: Rotary computes them on first use, so nothing is left
        # unmaterialised by from_pretrained's meta-device construction.
        pass

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """Causal LM over `input_ids`. Right padding (attention_mask zeros at the end of a row, as lm-eval
        batches log-likelihood requests) is exact: causal attention never lets a real token see it and
        the experts skip it. Left padding would need an attention mask the model does not take."""
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()
            if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
                raise ValueError("FoEForCausalLM supports right padding only (tokenizer.padding_side='right')")
        out = Transformer.forward(self, input_ids, token_mask_BL=mask)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(upcast(out.logits[:, :-1].flatten(0, 1)),
                                                     labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any
                        ) -> "FoEForCausalLM":
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        # Without generation_config.json, transformers reads sampling defaults out of config.json, where
        # `top_k` means experts per token: it would silently become top-k sampling. Rebuild the
        # generation config from the renamed model config instead.
        if not (Path(pretrained_model_name_or_path) / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_model_config(model.config)
        return model

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def register() -> None:
    try:
        AutoConfig.register("foe", FoEConfig)
        AutoModelForCausalLM.register(FoEConfig, FoEForCausalLM)
    except ValueError:
        pass  # already registered (re-import)


register()
