"""Shared fixtures: tiny configs and seeded models. Distributed helpers live in tests/parallel/."""

from __future__ import annotations

import pytest
import torch

from foe.config import ModelConfig
from foe.model import Transformer


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build (or load) the engine's native kernel once, up front, so that no server or rank process in a
    test waits ~30 s for the compiler inside its start-up timeout."""
    from foe.engine.kernels import decode_kernel_available
    decode_kernel_available(torch.device("cpu"))


def tiny(arch: str = "foe", **overrides) -> ModelConfig:
    return ModelConfig.from_preset("tiny", arch=arch, **overrides)


def build(cfg: ModelConfig, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg, **kw).eval()
    # Random norm weights so that per-group norms really differ (they start at ones).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)
