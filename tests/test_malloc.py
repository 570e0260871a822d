"""foe.malloc: with the tuning, a model's forward passes stop page-faulting their activations in
again on every call; with glibc's default they keep doing it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from foe.malloc import OPT_OUT, tune_malloc

# One MoE layer at d=256 over 2,048 tokens allocates tens of MB of activations per forward.
PROBE = """
import json, resource, torch
from foe.malloc import tune_malloc
tuned = tune_malloc()
from foe.config import ModelConfig
from foe.model import Transformer
torch.manual_seed(0)
model = Transformer(ModelConfig.from_preset("small", arch="moe", n_layers=1)).eval()
ids = torch.randint(0, model.cfg.vocab_size, (8, 256))
faults = []
with torch.inference_mode():
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(ids, logits_at=torch.arange(8))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def probe(opt_out: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env[OPT_OUT] = "0" if opt_out else "1"
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_tuned_heap_reuses_large_blocks() -> None:
    default, tuned = probe(opt_out=True), probe(opt_out=False)
    if not tuned["tuned"]:
        pytest.skip("this libc does not take mallopt settings (not glibc)")
    assert not default["tuned"]
    # Steady state (calls 3-8): glibc's default maps and unmaps the big blocks on every call (measured
    # 5,600-6,600 faults = ~24 MB per call); tuned, the heap keeps them (measured 0-2,049 per call, the
    # heap still grows now and then, so the test compares totals).
    steady_default, steady_tuned = sum(default["faults"][2:]), sum(tuned["faults"][2:])
    assert steady_default > 6 * 1000, default
    assert steady_tuned * 4 < steady_default, (default, tuned)


def test_opt_out_leaves_malloc_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OPT_OUT, "0")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert tune_malloc() is False
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ
