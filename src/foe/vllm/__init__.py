"""vLLM plugin: serve `foe` checkpoints (MoE and FoE, every sync mode) with vLLM, without conversion.

vLLM loads this through the `vllm.general_plugins` entry point in pyproject.toml, in every vLLM
process, before it reads a model's config:

    python -m vllm.entrypoints.openai.api_server --model runs/cq/foe --dtype float32 --enforce-eager

`register()` does two things: it registers model_type "foe" with transformers (`foe.vllm.config`, our
`foe.hf` config with Mixtral's field names for a MoE), so that vLLM reads our config.json as a Hugging
Face config, and it registers the architecture our config.json
declares ("FoEForCausalLM") with vLLM's ModelRegistry. The class is named as a string so that vLLM
imports it (and vLLM's layers) only in the processes that build the model.

Nothing here is imported by the rest of `foe`; vLLM is an optional extra (`pip install foe[vllm]`).
"""

from __future__ import annotations

ARCHITECTURE = "FoEForCausalLM"  # what `foe.model.checkpoint.config_to_hf` writes into config.json


def register() -> None:
    from vllm import ModelRegistry

    from foe.vllm.config import register_config

    register_config()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "foe.vllm.model:FoEForCausalLM")
