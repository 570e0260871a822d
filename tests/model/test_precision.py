"""Precision: float64 is float64 all the way (against an independent float64 forward, and through a
checkpoint bit for bit); bf16 models run their norms, rotary and routing in float32."""

from __future__ import annotations

import pytest
import torch

import foe.model.attention
from foe.model.checkpoint import load_checkpoint, save_checkpoint
from foe.model.layers import GroupRMSNorm, apply_rotary
from foe.model.router import TopKRouter
from tests.conftest import build, tiny
from tests.model.reference import reference_logits

ARCHS = [("moe", "attention"), ("foe", "attention"), ("foe", "moe"), ("foe", "both")]
F64 = dict(rtol=0.0, atol=1e-12)


def float64_model(arch: str, sync: str = "attention", **kw) -> torch.nn.Module:
    """A float64 model whose weights are not float32 numbers (so any float32 step would show)."""
    model = build(tiny(arch, sync=sync), **kw).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 1e-9 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
@pytest.mark.parametrize("arch,sync", ARCHS)
def test_float64_logits_match_an_independent_float64_forward(arch: str, sync: str, impl: str) -> None:
    model = float64_model(arch, sync, expert_impl=impl)
    x = torch.randint(0, 320, (2, 9))
    ref = torch.stack([reference_logits(model.cfg, model.state_dict(), row.tolist()) for row in x])
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(2, 9)
        parts = [model(x[:, :5], cache=cache).logits]  # prefill, then cached decode one token at a time
        parts += [model(x[:, t:t + 1], pos_BL=torch.full((2, 1), t), cache=cache).logits for t in range(5, 9)]
    assert full.dtype == cache.k.dtype == torch.float64
    torch.testing.assert_close(full, ref, **F64)
    torch.testing.assert_close(torch.cat(parts, 1), ref, **F64)


def test_float64_checkpoint_round_trip_is_exact(tmp_path) -> None:
    model = float64_model("foe")
    save_checkpoint(model, tmp_path)
    state = model.state_dict()
    x = torch.randint(0, 320, (2, 7))
    for loaded in (load_checkpoint(tmp_path), load_checkpoint(tmp_path, dtype=torch.float64)):
        assert all(torch.equal(v, state[k]) and v.dtype == torch.float64 for k, v in loaded.state_dict().items())
        with torch.no_grad():
            assert torch.equal(loaded(x).logits, model(x).logits)
    # another dtype is one rounding of the stored values (not a detour through float32)
    bf16 = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert all(torch.equal(v, state[k].to(torch.bfloat16)) for k, v in bf16.state_dict().items())


def test_a_checkpoint_loads_in_its_stored_dtype(tmp_path) -> None:
    save_checkpoint(build(tiny("moe")).to(torch.bfloat16), tmp_path)
    assert load_checkpoint(tmp_path).embed.weight.dtype == torch.bfloat16
    assert load_checkpoint(tmp_path, dtype=torch.float32).embed.weight.dtype == torch.float32


# Each precision-sensitive step, for a bf16 and a float64 model: computed in float32 and float64
# respectively (at least float32, never below the data's own precision), then cast back.
COMPUTE = [(torch.bfloat16, torch.float32), (torch.float64, torch.float64)]


@pytest.mark.parametrize("dtype,compute", COMPUTE)
def test_rms_norm_computes_in_at_least_float32(dtype: torch.dtype, compute: torch.dtype) -> None:
    norm = GroupRMSNorm(2, 32).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 32, dtype=torch.float64).to(dtype)
    xc = x.to(compute)
    expected = (xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype) * norm.weight[:, None]
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,compute", COMPUTE)
def test_rotary_tables_and_rotation_in_at_least_float32(monkeypatch, dtype: torch.dtype, compute: torch.dtype
                                                        ) -> None:
    """The model hands attention cos/sin tables in the compute dtype, exact to it (from float64 angles),
    even after `model.to(dtype)`; the rotation runs in that dtype and is cast back."""
    model = build(tiny("foe")).to(dtype)
    seen = []
    monkeypatch.setattr(foe.model.attention, "apply_rotary",
                        lambda x, cos, sin: seen.append((x, cos, sin)) or apply_rotary(x, cos, sin))
    pos = torch.tensor([[0, 3, 100, 255]])
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]), pos_BL=pos)
    x, cos, sin = seen[0]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    angles = pos[..., None].double() * inv_freq
    assert cos.dtype == sin.dtype == compute and x.dtype == dtype
    assert torch.equal(cos, angles.cos().to(compute)) and torch.equal(sin, angles.sin().to(compute))
    x1, x2 = x.to(compute).chunk(2, -1)
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    expected = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), -1).to(dtype)
    torch.testing.assert_close(apply_rotary(x, cos, sin), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,compute", COMPUTE)
def test_router_scores_in_at_least_float32(dtype: torch.dtype, compute: torch.dtype) -> None:
    router = TopKRouter(2, 32, 4, 2, "softmax", True, 0.2).to(dtype)
    x = torch.randn(2, 11, 32).to(dtype)
    r = router(x)
    logits = torch.bmm(x, router.weight).to(compute)  # the product in the model's dtype, as Mixtral's
    w, idx = logits.softmax(-1).topk(2, -1)
    assert r.weights_GTA.dtype == compute
    torch.testing.assert_close(r.weights_GTA, w / w.sum(-1, keepdim=True), rtol=0, atol=1e-7)
    assert torch.equal(r.experts_GTA, idx + torch.tensor([0, 4]).view(2, 1, 1))
