"""vLLM (with foe's plugin) against foe itself on the same float32 checkpoint: the same greedy tokens,
and the same top-5 logprobs at every generated position within LOGPROB_ATOL.

Skipped unless vLLM is importable (`pip install foe[vllm]`, docs/vllm.md). Each checkpoint runs vLLM
in its own process (`run_vllm.py`, ~35-60 s to start on a 2-core CPU): MoE and FoE in each sync mode
at tensor parallel 1, and FoE in each sync mode at tensor parallel 2 (group parallel, one group per
rank), where the test also reads the all-reduce count each rank logs, and the MoE on vLLM's Mixtral
at tensor parallel 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("vllm", reason="vLLM is not installed (pip install foe[vllm]; see docs/vllm.md)")

from foe.config import ModelConfig  # noqa: E402
from foe.generate import generate  # noqa: E402
from foe.model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from foe.model.transformer import Transformer  # noqa: E402
from foe.tokenizer import byte_level_tokenizer, load_tokenizer, save_tokenizer  # noqa: E402

# Both sides compute in float32 with different kernels (vLLM's paged attention vs SDPA, a flat batch vs
# one sequence); measured differences are ~1e-6 (docs/vllm.md), so 1e-4 leaves room without hiding a
# wrong layer, whose errors are O(0.1).
LOGPROB_ATOL = 1e-4
MAX_TOKENS = 12
PROMPTS = ["Hello world", "The federation of experts serves tokens", "a"]
RUN_VLLM = Path(__file__).with_name("run_vllm.py")
# (arch, sync, head_dim). head_dim 16 is what our presets use: vLLM's CPU attention pads it to 32, and a
# MoE runs on foe's modules; at head_dim 32 a MoE runs on vLLM's Mixtral (foe.vllm.mixtral).
CASES = [("moe", "attention", 16), ("moe", "attention", 32), ("foe", "attention", 16), ("foe", "moe", 16),
         ("foe", "both", 16), ("foe", "attention", 32)]


def make_checkpoint(directory: Path, arch: str, sync: str, head_dim: int, tie_embeddings: bool = False) -> Path:
    """A small random model with weights large enough that greedy choices are not near-ties, and
    per-group norms that differ, saved as `foe train` writes checkpoints (with the byte-level tokenizer)."""
    cfg = ModelConfig(arch=arch, sync=sync, vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=head_dim, n_experts=8, top_k=2, expert_hidden=64, max_seq_len=256, init_std=0.08,
                      tie_embeddings=tie_embeddings)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    save_checkpoint(model, directory)
    save_tokenizer(byte_level_tokenizer(), directory)
    # as in a `foe train` checkpoint: a second safetensors file that is not weights (vLLM must skip it)
    save_file({"state.0.exp_avg": torch.zeros(3)}, str(directory / "optimizer.safetensors"))
    return directory


def run_vllm(checkpoint: Path, tp: int = 1) -> tuple[list[dict], str]:
    """vLLM's results for PROMPTS, and its log (which says which model class it built)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ}
    if tp > 1:  # vLLM's CPU backend binds each rank to a NUMA node unless told cores: one core per rank
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(r) for r in range(tp)))
    proc = subprocess.run([sys.executable, str(RUN_VLLM), str(checkpoint), str(MAX_TOKENS), str(tp), *PROMPTS],
                          capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"vLLM failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):]), proc.stdout + proc.stderr


def check_against_foe(ckpt: Path, got: list[dict]) -> float:
    """Assert vLLM's tokens equal foe's greedy generation and its top-5 are foe's; returns the largest
    |logprob difference| over all reported tokens."""
    model = load_checkpoint(ckpt, dtype=torch.float32)
    tok = load_tokenizer(ckpt)
    worst = 0.0
    for prompt, out in zip(PROMPTS, got):
        ids = tok.encode(prompt).ids
        assert out["prompt_token_ids"] == ids, "vLLM tokenised the prompt differently from foe"
        assert out["token_ids"] == generate(model, [ids], MAX_TOKENS)[0], f"greedy tokens differ for {prompt!r}"
        # foe's logprobs at each generated position, from one forward pass over prompt + generation
        seq = torch.tensor([ids + out["token_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq).logits[0].double(), -1)
        for step, top in enumerate(out["logprobs"]):
            row = logp[len(ids) - 1 + step]
            theirs = sorted(top, key=lambda t: -top[t])[:5]
            assert [int(t) for t in theirs] == row.topk(5).indices.tolist(), f"top-5 differ at step {step} of {prompt!r}"
            worst = max(worst, *(abs(lp - float(row[int(t)])) for t, lp in top.items()))
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("arch,sync,head_dim", CASES, ids=[f"{a}-{s}-k{k}" for a, s, k in CASES])
def test_vllm_matches_foe(tmp_path: Path, arch: str, sync: str, head_dim: int) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", arch, sync, head_dim)
    got, log = run_vllm(ckpt)
    built = "FoEMixtralForCausalLM" if arch == "moe" and head_dim == 32 else "built as FoEForCausalLM"
    assert built in log, f"expected vLLM to build {built}"
    worst = check_against_foe(ckpt, got)
    print(f"tp 1 {arch}/{sync}/head_dim {head_dim}: max |logprob difference| {worst:.2e}")
    assert worst <= LOGPROB_ATOL


# sync -> all-reduces per forward of the 2-layer test model: one per layer (+1 final for "attention")
ALL_REDUCES = {"attention": 3, "moe": 2, "both": 4}


@pytest.mark.slow
@pytest.mark.parametrize("sync", list(ALL_REDUCES))
def test_vllm_group_parallel_matches_foe(tmp_path: Path, sync: str) -> None:
    """FoE at tensor parallel 2: each rank holds one of the 2 groups; same tokens and logprobs as foe on
    one process, and exactly the all-reduces FOE.md promises."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "foe", sync, 16)
    got, log = run_vllm(ckpt, tp=2)
    for rank in (0, 1):
        assert f"rank {rank}, forward 1: {ALL_REDUCES[sync]} all-reduces per forward" in log, log[-4000:]
    worst = check_against_foe(ckpt, got)
    print(f"tp 2 foe/{sync}: max |logprob difference| {worst:.2e}")
    assert worst <= LOGPROB_ATOL


@pytest.mark.slow
def test_vllm_moe_tensor_parallel_matches_foe(tmp_path: Path) -> None:
    """The MoE baseline on vLLM's Mixtral under vLLM's own tensor parallelism (heads and every expert
    split over 2 ranks): same tokens and logprobs as foe on one process."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "moe", "attention", 32)
    got, log = run_vllm(ckpt, tp=2)
    assert "FoEMixtralForCausalLM" in log
    worst = check_against_foe(ckpt, got)
    print(f"tp 2 moe (vLLM's Mixtral): max |logprob difference| {worst:.2e}")
    assert worst <= LOGPROB_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("arch,head_dim", [("moe", 32), ("foe", 16)])
def test_vllm_tied_embeddings_match_foe(tmp_path: Path, arch: str, head_dim: int) -> None:
    """A checkpoint with a tied head stores no head.weight: both vLLM models must tie it themselves."""
    ckpt = make_checkpoint(tmp_path / "ckpt", arch, "attention", head_dim, tie_embeddings=True)
    got, _ = run_vllm(ckpt)
    worst = check_against_foe(ckpt, got)
    print(f"tp 1 {arch} tied embeddings: max |logprob difference| {worst:.2e}")
    assert worst <= LOGPROB_ATOL
