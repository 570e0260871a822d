"""A tiny in-process server for the API tests: one engine over the byte-level tokenizer."""

from __future__ import annotations

from typing import Any

from torch import nn

from foe.engine.engine import LLMEngine
from foe.engine.launch import ServerHandle
from foe.engine.scheduler import SchedulerConfig
from foe.engine.server import ServerConfig
from foe.tokenizer import byte_level_tokenizer


def tiny_server(model: nn.Module, **config: Any) -> ServerHandle:
    """`with tiny_server(model, chat_template=...) as s:` serves `model` as "tiny-foe" on a free port."""
    engine = LLMEngine.from_model(model, SchedulerConfig(num_blocks=128, block_size=4), byte_level_tokenizer())
    return ServerHandle(engine, ServerConfig(model_name="tiny-foe", **config))
