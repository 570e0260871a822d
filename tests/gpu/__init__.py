"""Tests that need a CUDA device (`pytest -m gpu`; scripts/gpu-check.sh runs them with a report). Without
one they are collected and skipped, so the regular suite stays green on a CPU machine."""

from __future__ import annotations

import pytest
import torch

# every module here: `pytestmark = CUDA`
CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
